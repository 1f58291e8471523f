"""Stage-1 passes 2-4 over one block: candidate search, single-stream rescoring, fusion.

A block is the group of shards that stage 2 mixes in one shuffle buffer, so its
rows are the concatenation of its shards' rows. Image row ``i`` and text row
``j`` below are block rows; ``text_image[j]`` is the image of caption ``j``.

- search: top-k texts per image and top-k images per text by the fused
  dual-stream logit ``sum_t w_t * s_t * <img_t, txt_t>`` (``s_t`` the teacher's
  logit scale), as one blocked matrix product over sqrt-scaled concatenated
  embeddings; never an n x t matrix.
- rescore: ITM logits for exactly the candidate pairs of both directions plus
  every positive pair, each distinct pair once, in image order so every image's
  vision tokens are computed once per chunk; plus the positive pairs' fused
  features for the integration module.
- fuse: a named fusion rule on the (dual, ITM) logits of every candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mcad_cache.fusion import fuse
from mcad_cache.topk import blocked_topk, fuse_embeddings


@dataclass
class BlockEmbeddings:
    """View-0 embeddings of one block's rows, per teacher, plus the caption-to-image map."""

    keys: np.ndarray  # (n,) str
    text_image: torch.Tensor  # (t,) int64 block image row of every caption
    images: dict[str, torch.Tensor]  # teacher -> (n, D) float32
    texts: dict[str, torch.Tensor]  # teacher -> (t, D) float32


def dual_logit_embeddings(
    emb: BlockEmbeddings, teachers: list[str], weights: list[float], scales: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text vectors whose dot product is the fused dual-stream logit."""
    factors = [w * s for w, s in zip(weights, scales, strict=True)]
    images = fuse_embeddings([emb.images[t] for t in teachers], factors)
    texts = fuse_embeddings([emb.texts[t] for t in teachers], factors)
    return images, texts


def search(image_vecs: torch.Tensor, text_vecs: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """The search pass's arrays: candidate rows and their dual logits, both directions."""
    k_texts, k_images = min(k, len(text_vecs)), min(k, len(image_vecs))
    if (k_texts, k_images) != (k, k):
        raise ValueError(f"k={k} exceeds this block's {len(image_vecs)} images / {len(text_vecs)} texts; "
                         "lower k or raise block_shards")
    i2t_dual, i2t_ids = blocked_topk(image_vecs, text_vecs, k)
    t2i_dual, t2i_ids = blocked_topk(text_vecs, image_vecs, k)
    return {
        "i2t/ids": i2t_ids.int().numpy(), "i2t/dual": i2t_dual.numpy(),
        "t2i/ids": t2i_ids.int().numpy(), "t2i/dual": t2i_dual.numpy(),
    }


@dataclass
class PairPlan:
    """The distinct (image, text) pairs to score, sorted by image, and where each list entry finds its score."""

    images: torch.Tensor  # (P,) int64
    texts: torch.Tensor  # (P,) int64
    i2t_slot: torch.Tensor  # (n, k) index into the P pairs
    t2i_slot: torch.Tensor  # (t, k)
    pos_slot: torch.Tensor  # (t,)

    def __len__(self) -> int:
        return len(self.images)


def plan_pairs(i2t_ids: torch.Tensor, t2i_ids: torch.Tensor, text_image: torch.Tensor) -> PairPlan:
    """Deduplicate the candidate and positive pairs: i2t and t2i lists overlap, and positives often recur."""
    n, t = i2t_ids.shape[0], t2i_ids.shape[0]
    i2t_pairs = torch.arange(n).unsqueeze(1) * t + i2t_ids.long()
    t2i_pairs = t2i_ids.long() * t + torch.arange(t).unsqueeze(1)
    pos_pairs = text_image.long() * t + torch.arange(t)
    everything = torch.cat([i2t_pairs.reshape(-1), t2i_pairs.reshape(-1), pos_pairs])
    unique, inverse = torch.unique(everything, sorted=True, return_inverse=True)
    a, b = i2t_pairs.numel(), t2i_pairs.numel()
    return PairPlan(
        images=unique // t, texts=unique % t,
        i2t_slot=inverse[:a].view(n, -1), t2i_slot=inverse[a : a + b].view(t, -1), pos_slot=inverse[a + b :],
    )


def rescore(
    plan: PairPlan,
    vision_tokens: Callable[[torch.Tensor], torch.Tensor],
    itm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    image_chunk: int,
    pair_batch: int,
    fused_dim: int,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM logit of every planned pair, and the fused feature of every planned pair.

    ``vision_tokens(image_rows)`` gives the single-stream vision tokens of those
    block images; ``itm(tokens, image_rows, text_rows)`` scores the pairs
    (``tokens[image_rows[i]]``, ``text_rows[i]``) and returns (logits, fused
    features). Pairs are sorted by image, so each image chunk's tokens are
    computed once and serve all of that chunk's pairs, and within a pair batch
    each image's cross-attention keys and values are computed once.
    """
    logits = torch.empty(len(plan))
    fused = torch.empty(len(plan), fused_dim, dtype=torch.float16)
    bounds = torch.searchsorted(plan.images, torch.arange(0, int(plan.images.max()) + image_chunk + 1, image_chunk))
    bar = tqdm(total=len(plan), desc="rescore pairs", unit="pair", disable=not progress, mininterval=2.0)
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if lo == hi:
            continue
        chunk_images = torch.unique(plan.images[lo:hi])
        tokens = vision_tokens(chunk_images)
        local = torch.searchsorted(chunk_images, plan.images[lo:hi])
        for start in range(lo, hi, pair_batch):
            stop = min(hi, start + pair_batch)
            rows = local[start - lo : stop - lo]
            score, feature = itm(tokens, rows, plan.texts[start:stop])
            logits[start:stop] = score.float()
            fused[start:stop] = feature.to(torch.float16)
            bar.update(stop - start)
    bar.close()
    return logits, fused


def rescore_arrays(plan: PairPlan, logits: torch.Tensor, fused: torch.Tensor) -> dict[str, np.ndarray]:
    return {
        "i2t/itm": logits[plan.i2t_slot].numpy(),
        "t2i/itm": logits[plan.t2i_slot].numpy(),
        "pos/itm": logits[plan.pos_slot].numpy(),
        "pos/feature": fused[plan.pos_slot].numpy(),
    }


def fuse_arrays(lists: dict[str, np.ndarray], rule: str, a: float) -> dict[str, np.ndarray]:
    """The fused target logits of both directions under the named rule."""
    out = {}
    for direction in ("i2t", "t2i"):
        z_dual = torch.from_numpy(lists[f"{direction}/dual"])
        z_itm = torch.from_numpy(lists[f"{direction}/itm"])
        out[f"{direction}/fused"] = fuse(rule, z_dual, z_itm, a).numpy()
    return out
