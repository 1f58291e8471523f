"""Which dual weights rank the distillation set best (`mcad cache-info --weights`).

The kd target, the candidate search and the integrated features all read the dual-stream teachers through one
weighted sum of their logits (the store's ``dual_weights``; equal by default). When one teacher ranks much
worse than another, equal weights hand the student part of the weaker teacher's mistakes. The store holds
every teacher's embeddings of the distillation set and which image each caption belongs to, so the ranking
quality of any weighting can be counted there, before a student is trained: for every point of a grid over
the weights, the share of images whose top-scored caption (over the whole block) is one of their own, and of
captions whose top-scored image is theirs. The teachers never trained on these pairs (they are the student's
data), so the count is a held-out measure of each weighting. `mcad cache --dual-weighting ranked` makes the
best weighting on the first block the store's own (mcad_cache.job.search_dual_weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import math
from itertools import combinations

import torch

CHUNK = 1024  # image rows per logit slab: (CHUNK, texts) floats per teacher at a time
RANKED_STEPS = 10  # `mcad cache --dual-weighting ranked` chooses among weights in tenths


def simplex_grid(n_teachers: int, steps: int) -> list[tuple[float, ...]]:
    """Every weight vector of ``n_teachers`` non-negative multiples of ``1/steps`` that sum to 1, in
    lexicographic order of the integer parts (for 2 teachers and 4 steps: (0, 1), (0.25, 0.75), ... (1, 0))."""
    if n_teachers < 1 or steps < 1:
        raise ValueError(f"need at least one teacher and one step, got {n_teachers} teachers, {steps} steps")
    points = []
    # stars and bars: the positions of n-1 bars among steps + n - 1 slots
    for bars in combinations(range(steps + n_teachers - 1), n_teachers - 1):
        edges = (-1, *bars, steps + n_teachers - 1)
        points.append(tuple((edges[i + 1] - edges[i] - 1) / steps for i in range(n_teachers)))
    return sorted(points)


def block_top1(images: Sequence[torch.Tensor], texts: Sequence[torch.Tensor], scales: Sequence[float],
               text_image: torch.Tensor, weights_grid: Sequence[Sequence[float]]) -> torch.Tensor:
    """(len(weights_grid), 2) int64 for one block: per weighting, the images whose top-scored caption is one of
    theirs and the captions whose top-scored image is theirs, over the whole block.

    ``images[t]`` / ``texts[t]``: teacher ``t``'s embeddings of the block's images and captions, ``scales[t]``
    its logit scale, ``text_image[j]`` caption ``j``'s image row. The logits are built a slab of image rows at a
    time (a block's (images, captions) logits need not fit): the i2t counts add up over slabs, the t2i argmax is
    carried across them. Ties go to the lowest index, as one argmax would.
    """
    n = len(images[0])
    grid = torch.tensor(weights_grid, dtype=torch.float32)
    i2t = torch.zeros(len(grid), dtype=torch.long)
    best = torch.full((len(grid), len(text_image)), -torch.inf)
    best_row = torch.zeros((len(grid), len(text_image)), dtype=torch.long)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        slab = [s * im[start:stop] @ tx.t() for im, tx, s in zip(images, texts, scales, strict=True)]
        for g, weights in enumerate(grid.tolist()):
            combined = sum(w * logits for w, logits in zip(weights, slab, strict=True))  # (rows, captions)
            i2t[g] += int((text_image[combined.argmax(dim=1)] == torch.arange(start, stop)).sum())
            value, row = combined.max(dim=0)
            better = value > best[g]  # strict: an earlier slab keeps a tie, as one argmax over all rows would
            best[g] = torch.where(better, value, best[g])
            best_row[g] = torch.where(better, row + start, best_row[g])
    t2i = (best_row == text_image).sum(dim=1)
    return torch.stack([i2t, t2i], dim=1)


def weighting_grid(n_teachers: int, steps: int) -> list[tuple[float, ...]]:
    """``simplex_grid`` with equal weights added where the grid lacks them (3 teachers in tenths): equal is
    what every other weighting is measured against."""
    grid = simplex_grid(n_teachers, steps)
    equal = tuple([1 / n_teachers] * n_teachers)
    if not any(_same(point, equal) for point in grid):
        grid = sorted([*grid, equal])
    return grid


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


def summarize(teachers: Sequence[str], weights_grid: Sequence[Sequence[float]], blocks: Iterable[torch.Tensor],
              images: int, captions: int) -> dict:
    """Pool the blocks' counts into shares per weighting; name the ``best`` (the highest mean of the two shares,
    a tie going to the weighting nearest equal) and the one ``chosen`` by `--dual-weighting ranked`: the best,
    unless its mean share passes equal weights' by no more than ``margin``, two standard errors of equal's mean
    share (binomial, as if the weightings' counts were independent: they are not, so this errs toward
    equal). On teachers of one quality the shares differ by noise alone and the weights stay equal.
    """
    totals = sum(blocks)
    equal = tuple([1 / len(teachers)] * len(teachers))
    rows, shares = [], []
    for weights, (i2t, t2i) in zip(weights_grid, totals.tolist(), strict=True):
        share = (i2t / images, t2i / captions)
        shares.append(share)
        rows.append({"weights": [round(w, 4) for w in weights], "i2t_top1": round(share[0], 4),
                     "t2i_top1": round(share[1], 4), "mean_top1": round(sum(share) / 2, 4)})
    at_equal = [i for i, weights in enumerate(weights_grid) if _same(weights, equal)]
    if not at_equal:
        raise ValueError(f"the grid lacks equal weights {equal} (use weighting_grid)")
    best = max(range(len(rows)), key=lambda i: (sum(shares[i]), -sum(abs(w - e) for w, e in zip(
        weights_grid[i], equal, strict=True))))
    (p_i, p_t) = shares[at_equal[0]]
    margin = 2 * math.sqrt(p_i * (1 - p_i) / images + p_t * (1 - p_t) / captions) / 2
    gain = (sum(shares[best]) - sum(shares[at_equal[0]])) / 2
    chosen = best if gain > margin else at_equal[0]
    return {"teachers": list(teachers), "images": images, "captions": captions, "rows": rows,
            "best": rows[best]["weights"], "chosen": rows[chosen]["weights"], "margin": round(margin, 4),
            "gain": round(gain, 4)}


def embedding_counts(emb, teachers: Sequence[str], scales: Sequence[float],
                     weights_grid: Sequence[Sequence[float]]) -> torch.Tensor:
    """``block_top1`` of a block as ``mcad_cache.job.load_block_embeddings`` reads it (the search pass's
    ``BlockEmbeddings``): what `mcad cache-info --weights` and the ranked rule both count."""
    return block_top1([emb.images[t] for t in teachers], [emb.texts[t] for t in teachers], scales,
                      emb.text_image, weights_grid)
