"""`mcad cache`'s configuration (stage 1)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mcad_core.config import jsonable

TEACHER_PRECISIONS = ("fp32", "amp-bf16", "amp-fp16")  # CacheConfig.precision; mcad_cache/embed.py maps them to dtypes
# CacheConfig.dual_weighting: how the dual-stream teachers are weighed when dual_weights is not given. "equal";
# or "ranked": the weighting (on a grid of tenths) that ranks the first block's own pairs best
# (mcad_cache/weighing.py), chosen once, after that block is embedded and before its candidates are searched.
DUAL_WEIGHTINGS = ("equal", "ranked")


@dataclass(frozen=True)
class CacheConfig:
    """`mcad cache`: run the teachers once over ``shards`` and write the Zarr store ``store``.

    Teachers come from ``teachers_dir`` (what `mcad teachers` wrote) or are named
    explicitly: ``dual`` as open_clip specs ("ViT-B-16:openai", "local-dir:PATH",
    "hf-hub:ORG/REPO"), ``single`` as a single-stream spec (a BLIP ITM hub id or directory, or
    ``KIND:NAME`` of a registered kind, mcad_cache/teachers/single.py), and
    ``tokenizer`` (the student's, used for the stored caption tokens).
    """

    shards: str = "data/default/train"
    store: Path = Path("artifacts/cache/default.zarr")
    teachers_dir: Path | None = Path("artifacts/teachers")
    dual: tuple[str, ...] = ()
    single: str | None = None
    tokenizer: str | None = None
    context_length: int = 24  # caption tokens stored for the student
    # Images are resized to this square size before views are cut (None: the largest teacher input size,
    # so no teacher sees an image shrunk below its own input and scaled back up).
    source_size: int | None = None
    views: int = 1
    # Views of the single-stream teacher's ITC image embeddings to store: "first" (view 0; nothing downstream
    # reads more, and at 30 views this saves 1/3 of a ViT-L x2 + BLIP-large store and the BLIP vision pass
    # of 29 views) or "all".
    single_itc_views: str = "first"
    view_scale: tuple[float, float] = (0.6, 1.0)
    seed: int = 0
    k: int = 11
    block_shards: int = 4  # shards per candidate-search block (stage 2 shuffles within a block)
    dual_weights: tuple[float, ...] = ()  # per dual teacher; empty = chosen by dual_weighting
    dual_weighting: str = "equal"  # DUAL_WEIGHTINGS; ignored when dual_weights is given
    # The ITM logit added to the candidates' dual logit (BLIP's own ITM + ITC ranking). The paper's
    # reconstruction, a * dual + (1 - a) * ITM, mixes logits of different scales: the candidates' dual logits
    # are ~14.6 and their ITM logits ~0, so a=0.5 halves every candidate below the pairs outside the list
    # (docs/results.md, stage 2: the fused targets' in-batch top-1 drops from 22.5 % to 19.4 %; itm_topk lifts it to 24.8 %).
    fusion_rule: str = "itm_topk"
    fusion_a: float = 1.0
    batch_size: int = 256
    itm_batch_size: int = 512
    integration_dim: int = 128
    integration_steps: int = 300
    on_error: str = "warn"  # bad samples are skipped, counted and recorded in the manifest
    # Images with more pixels are bad samples (skipped and counted, or an error under on_error="raise"), refused
    # from their header without being decoded; None: no limit of mcad's own (PIL's decompression-bomb check stays).
    max_image_pixels: int | None = 50_000_000  # mcad_core.shards.DEFAULT_MAX_IMAGE_PIXELS (not imported: no torch here)
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: str = "auto"  # "auto": cuda:$LOCAL_RANK when CUDA is available, else cpu
    # The teachers' arithmetic: "fp32", or their forwards under torch.autocast to bfloat16 ("amp-bf16") or
    # float16 ("amp-fp16", CUDA only); embeddings are stored as float16 either way. Recorded in the manifest
    # only when not "fp32", so stores made before the setting existed still match.
    precision: str = "fp32"
    # Processes that decode and tokenize shards for the embed pass (torch DataLoader workers) while the main
    # process runs the teachers; 0: one reader thread in the main process. Same store either way.
    workers: int = 0

    def __post_init__(self) -> None:
        """Every check that needs no data, so a typo fails before a teacher loads or a store is created."""
        positive = {"k": self.k, "views": self.views, "block_shards": self.block_shards,
                    "batch_size": self.batch_size, "itm_batch_size": self.itm_batch_size,
                    "integration_dim": self.integration_dim, "context_length": self.context_length,
                    "source_size": self.source_size, "max_image_pixels": self.max_image_pixels}
        bad = [f"{name} must be >= 1, got {value}" for name, value in positive.items()
               if value is not None and value < 1]
        if self.integration_steps < 0:
            bad.append(f"integration_steps must be >= 0, got {self.integration_steps}")
        if self.threads < 0:
            bad.append(f"threads must be >= 0, got {self.threads}")
        if self.workers < 0:
            bad.append(f"workers must be >= 0, got {self.workers}")
        if self.precision not in TEACHER_PRECISIONS:
            bad.append(f"precision must be one of {', '.join(TEACHER_PRECISIONS)}, got {self.precision!r}")
        low, high = self.view_scale
        if not 0.0 < low <= high <= 1.0:
            bad.append(f"view_scale must satisfy 0 < low <= high <= 1, got {tuple(self.view_scale)}")
        if any(w < 0 for w in self.dual_weights) or (self.dual_weights and not sum(self.dual_weights) > 0):
            bad.append(f"dual_weights must be >= 0 with a positive sum, got {tuple(self.dual_weights)}")
        if self.dual_weighting not in DUAL_WEIGHTINGS:
            bad.append(f"dual_weighting must be one of {', '.join(DUAL_WEIGHTINGS)}, got {self.dual_weighting!r}")
        if self.single_itc_views not in ("first", "all"):
            bad.append(f"single_itc_views must be 'first' or 'all', got {self.single_itc_views!r}")
        if not math.isfinite(self.fusion_a):
            bad.append(f"fusion_a must be a finite number, got {self.fusion_a}")
        if self.on_error not in ("warn", "raise"):
            bad.append(f"on_error must be 'warn' or 'raise', got {self.on_error!r}")
        if bad:
            raise ValueError("; ".join(bad))

    def to_dict(self) -> dict:
        return jsonable(asdict(self))
