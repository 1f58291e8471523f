"""The integration module: dual-stream and single-stream teacher features gated into one space.

The paper's "modified teacher features" mix what the dual-stream teacher embeds with what the
single-stream teacher's cross-attention saw. The module is small, so stage 1 trains it once on
the cached features (minutes, no teacher in the loop) with a contrastive loss on ground truth
plus a KL loss towards the fused target distribution, then writes its outputs (the
*integrated features*) to the store for stage 2's feature alignment terms.

A store's features need not fit in memory: a feature table may be a ``RowFile`` on disk, of which each
training step reads its batch's rows, and ``integrated_spans`` hands the integrated features out one
block's rows at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mcad_cache.targets import neighbor_batches, pick_texts, rebuild_target_logits

FEATURE_KEYS = (
    "dual_image", "single_image", "dual_text", "single_text", "text_image", "first", "count",
    "i2t_ids", "i2t_fused", "t2i_ids", "t2i_fused", "dual_scale",
)


class RowFile:
    """A float32 feature table on disk: rows appended block by block, read back by a slice or a row index tensor.

    Indexed like the (rows, dim) tensor it stands for. A read copies exactly the rows asked for out of the
    file (``os.preadv``; a memory map would make neighbouring pages resident too), so the table never
    becomes memory of the process, whatever its size.
    """

    device = torch.device("cpu")

    def __init__(self, path: str | Path, dim: int) -> None:
        self.path, self.dim, self.rows = Path(path), dim, 0
        self.path.write_bytes(b"")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    def __len__(self) -> int:
        return self.rows

    def append(self, rows: torch.Tensor) -> None:
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"{self.path.name}: rows of shape {tuple(rows.shape)}, the table has width {self.dim}")
        with open(self.path, "ab") as handle:
            handle.write(memoryview(rows.detach().float().contiguous().numpy()).cast("B"))
        self.rows += len(rows)

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        width = 4 * self.dim
        if isinstance(index, slice):
            lo, hi, step = index.indices(self.rows)
            if step != 1:
                raise ValueError("a RowFile is read by contiguous slices or by row indices")
            spans = [(lo, max(0, hi - lo))]
        else:
            rows = index.cpu().long()
            if len(rows) and not bool(((rows >= 0) & (rows < self.rows)).all()):
                raise IndexError(f"a row index is outside the {self.rows} rows")
            spans = [(row, 1) for row in rows.tolist()]
        out = bytearray(width * sum(count for _, count in spans))
        view = memoryview(out)
        with open(self.path, "rb", buffering=0) as handle:
            at = 0
            for row, count in spans:
                size = width * count
                if size and os.preadv(handle.fileno(), [view[at : at + size]], width * row) != size:
                    raise OSError(f"{self.path}: short read at row {row}")
                at += size
        return torch.from_numpy(np.frombuffer(out, dtype=np.float32).reshape(-1, self.dim))


@dataclass(frozen=True)
class IntegrationConfig:
    dim: int = 128
    steps: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 0.05
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    seed: int = 0


class _GatedBranch(nn.Module):
    """Project both features to ``dim`` and mix them per channel with a learned sigmoid gate.

    The gate sees both projections, so it can lean on the single-stream feature where that
    one carries evidence the dual-stream embedding lacks, and fall back to the dual one elsewhere.
    """

    def __init__(self, dual_dim: int, single_dim: int, dim: int):
        super().__init__()
        self.dual = nn.Linear(dual_dim, dim)
        self.single = nn.Linear(single_dim, dim)
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, dual: torch.Tensor, single: torch.Tensor) -> torch.Tensor:
        p_dual, p_single = self.dual(dual.float()), self.single(single.float())
        g = torch.sigmoid(self.gate(torch.cat([p_dual, p_single], dim=-1)))
        return F.normalize(g * p_dual + (1.0 - g) * p_single, dim=-1)


class IntegrationModule(nn.Module):
    """Two gated branches (image, text) with their own weights; outputs are unit vectors."""

    def __init__(self, dual_dim: int, single_dim: int, dim: int):
        super().__init__()
        self.dual_dim, self.single_dim, self.dim = dual_dim, single_dim, dim
        self.image = _GatedBranch(dual_dim, single_dim, dim)
        self.text = _GatedBranch(dual_dim, single_dim, dim)

    def images(self, dual: torch.Tensor, single: torch.Tensor) -> torch.Tensor:
        """(B, dim) integrated image features."""
        return self.image(dual, single)

    def texts(self, dual: torch.Tensor, single: torch.Tensor) -> torch.Tensor:
        """(B, dim) integrated text features."""
        return self.text(dual, single)

    def forward(
        self, dual_image: torch.Tensor, single_image: torch.Tensor, dual_text: torch.Tensor, single_text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images(dual_image, single_image), self.texts(dual_text, single_text)


def _kl(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-mean KL(softmax(target / T) || softmax(student / T)); no T^2 factor, the weight is explicit."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(target_logits.float() / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def integration_losses(
    model: IntegrationModule, batch: dict, temperature: float, kl_weight: float, kl_temperature: float
) -> dict[str, torch.Tensor]:
    """{"contrastive", "kl", "loss"} for a batch of (image, positive text) pairs, row i with row i.

    contrastive: symmetric InfoNCE on the integrated features at ``temperature``, so they stay a
    retrieval space; kl: mean over i2t and t2i of KL(target || student) towards the rebuilt fused
    targets, so they carry the single-stream teacher's ranking; loss = contrastive + kl_weight * kl.
    """
    image = model.images(batch["dual_image"], batch["single_image"])
    text = model.texts(batch["dual_text"], batch["single_text"])
    logits = image @ text.t() / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    contrastive = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    kl = 0.5 * (_kl(batch["i2t_target"], logits, kl_temperature) + _kl(batch["t2i_target"], logits.t(), kl_temperature))
    return {"contrastive": contrastive, "kl": kl, "loss": contrastive + kl_weight * kl}


def _epochs(features: dict, batch_size: int, generator: torch.Generator):
    """Endless neighbor-aware batches, reshuffled each epoch; batches of one image teach nothing and are dropped."""
    while True:
        batches = [b for b in neighbor_batches(features["i2t_ids"], features["text_image"], batch_size, generator)
                   if len(b) > 1]
        if not batches:
            raise ValueError("integration training needs at least 2 images per batch")
        yield from batches


def train_integration(
    features: dict[str, torch.Tensor], cfg: IntegrationConfig, progress: bool = True
) -> tuple[IntegrationModule, dict]:
    """Train the integration module on cached features; returns (model in eval mode, summary).

    ``features`` may concatenate several blocks, provided the id tables (``i2t_ids``,
    ``t2i_ids``, ``text_image``, ``first``) index the concatenated rows. The four feature tables
    may be ``RowFile``s, from which each step reads its batch's rows (the same numbers as from
    tensors). Training runs on the device of ``dual_image``; the summary holds first_loss,
    last_loss (single-step values; NaN for 0 steps), steps and seconds. ``steps=0`` returns the
    seeded initial module.
    """
    missing = [key for key in FEATURE_KEYS if key not in features]
    if missing:
        raise KeyError(f"integration features lack {missing}")
    device = features["dual_image"].device
    tables = {key: features[key] if isinstance(features[key], RowFile) else features[key].to(device).float()
              for key in ("dual_image", "single_image", "dual_text", "single_text")}
    dual_scale = float(features["dual_scale"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = IntegrationModule(tables["dual_image"].shape[1], tables["single_image"].shape[1], cfg.dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = _epochs(features, cfg.batch_size, generator)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc="integrate", unit="step", disable=not progress)
    for step in bar:
        images = next(batches)
        texts = pick_texts(images, features["first"], features["count"], generator)
        img, txt = images.to(device), texts.to(device)
        rows = {key: table[img if key.endswith("image") else txt].to(device) for key, table in tables.items()}
        with torch.no_grad():
            dual_logits = dual_scale * rows["dual_image"] @ rows["dual_text"].t()
            i2t_target, t2i_target = rebuild_target_logits(
                dual_logits, images, texts, features["text_image"],
                features["i2t_ids"], features["i2t_fused"], features["t2i_ids"], features["t2i_fused"],
            )
        batch = {**rows, "i2t_target": i2t_target, "t2i_target": t2i_target}
        loss = integration_losses(model, batch, cfg.temperature, cfg.kl_weight, cfg.kl_temperature)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0 or step == cfg.steps - 1 or step % 20 == 0:
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    summary = {
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "steps": cfg.steps,
        "seconds": time.perf_counter() - start,
    }
    return model, summary


@torch.no_grad()
def integrated_features(
    model: IntegrationModule,
    dual_image: torch.Tensor,
    single_image: torch.Tensor,
    dual_text: torch.Tensor,
    single_text: torch.Tensor,
    batch: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, dim), texts (t, dim)) float32 on the inputs' device, computed in chunks of ``batch`` rows."""

    def run(side: str, dual: torch.Tensor, single: torch.Tensor) -> torch.Tensor:
        return next(integrated_spans(model, side, dual, single, [(0, len(dual))], batch))

    return run("image", dual_image, single_image), run("text", dual_text, single_text)


@torch.no_grad()
def integrated_spans(
    model: IntegrationModule,
    side: str,
    dual: torch.Tensor | RowFile,
    single: torch.Tensor | RowFile,
    spans: Sequence[tuple[int, int]],
    batch: int = 4096,
) -> Iterator[torch.Tensor]:
    """The ``side`` ("image" or "text") branch's features of rows ``[lo, hi)`` for each span in turn.

    ``spans`` are consecutive from row 0 (one block's rows each). The rows are computed in the chunks of
    ``batch`` rows from row 0 that :func:`integrated_features` uses, so they are the same bit for bit,
    with no more than a span and a chunk of features in memory.
    """
    if len(dual) != len(single):
        raise ValueError(f"{len(dual)} dual rows but {len(single)} single-stream rows")
    branch = model.images if side == "image" else model.texts
    device = next(model.parameters()).device
    done, computed = 0, []  # rows [done, done + rows in ``computed``) are computed, not yet handed out
    for lo, hi in spans:
        if lo != done or hi > len(dual):
            raise ValueError(f"span {(lo, hi)} does not follow row {done} within {len(dual)} rows")
        end = done + sum(len(c) for c in computed)
        while end < hi:
            chunk = branch(dual[end : end + batch].to(device), single[end : end + batch].to(device)).to(dual.device)
            computed.append(chunk)
            end += len(chunk)
        rows = torch.cat(computed) if computed else torch.zeros((0, model.dim), device=dual.device)
        yield rows[: hi - lo]
        computed, done = [rows[hi - lo :].clone()], hi
