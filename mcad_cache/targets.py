"""In-batch target logits from the cache, and the batching that makes the cached candidates count.

A *block* holds ``n`` images and ``t`` captions (``text_image[j]`` is caption ``j``'s image row).
Stage 1 cached, per anchor, a top-k candidate list with fused target logits. A training batch
sees only ``B`` of those rows, so the target for the batch is rebuilt: the dual-stream logits
of the batch (a cheap matmul of cached embeddings) with every cached candidate that happens to
be in the batch overwritten by its fused logit. The renormalization over what is in the batch
is the softmax the loss applies, so nothing here normalizes.

Candidates only help when they share a batch with their anchor; :func:`neighbor_batches`
arranges that. All functions are pure (no I/O) and deterministic given the generator.
"""

from __future__ import annotations

import torch


def _overwrite(
    base: torch.Tensor, cand_ids: torch.Tensor, cand_fused: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """``base`` (B, C) with entry (r, c) replaced by the fused logit where ``columns[c]`` is in row r's list.

    ``cand_ids``/``cand_fused`` are the (B, k) lists of the batch's row anchors. Each listed id is
    looked up in the sorted columns (every column holding it, should a column repeat), and the
    hits are written with one scatter: O(B k log C), where comparing every slot with every column
    costs O(B k C). Were an id listed twice in a row, its first (best-ranked) slot wins rather than
    the two being summed.
    """
    k = cand_ids.shape[1]
    sorted_columns, order = torch.sort(columns)
    ids = cand_ids.contiguous()
    first = torch.searchsorted(sorted_columns, ids)
    count = torch.searchsorted(sorted_columns, ids, right=True) - first  # columns holding each listed id
    repeated = (ids[:, :, None] == ids[:, None, :]).tril(diagonal=-1).any(dim=2)
    count = count.masked_fill(repeated, 0).reshape(-1)
    slots = torch.repeat_interleave(count)  # one entry per (slot, matching column)
    within = torch.arange(len(slots), device=ids.device) - (torch.cumsum(count, 0) - count)[slots]
    out = base.clone(memory_format=torch.contiguous_format)
    out[slots // k, order[first.reshape(-1)[slots] + within]] = cand_fused.reshape(-1).to(base.dtype)[slots]
    return out


def _rows(table: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table[rows]`` moved to ``device``: the cache tables may stay on CPU while the logits are on GPU."""
    return table[rows.to(table.device)].to(device)


def rebuild_target_logits(
    dual_logits: torch.Tensor,
    batch_images: torch.Tensor,
    batch_texts: torch.Tensor,
    text_image: torch.Tensor,
    i2t_ids: torch.Tensor,
    i2t_fused: torch.Tensor,
    t2i_ids: torch.Tensor,
    t2i_fused: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits (i2t (B, B), t2i (B, B)) for a batch, from its dual logits and the cached lists.

    ``dual_logits[i, j]`` scores batch image ``i`` against batch text ``j``. Pairs outside an
    anchor's list keep the dual-stream logit (the design's fusion convention); pairs inside
    take the fused logit. Another caption of the same image is a different text row, so it
    only matches if it is the caption the batch picked.
    """
    if dual_logits.shape != (len(batch_images), len(batch_texts)):
        raise ValueError(f"dual logits {tuple(dual_logits.shape)} do not match a batch of "
                         f"{len(batch_images)} images and {len(batch_texts)} texts")
    every = torch.arange(len(batch_images), device=dual_logits.device)
    return rebuild_target_rows(dual_logits, dual_logits.t(), every, batch_images, batch_texts, text_image,
                               i2t_ids, i2t_fused, t2i_ids, t2i_fused)


def rebuild_target_rows(
    i2t_rows: torch.Tensor,
    t2i_rows: torch.Tensor,
    positions: torch.Tensor,
    batch_images: torch.Tensor,
    batch_texts: torch.Tensor,
    text_image: torch.Tensor,
    i2t_ids: torch.Tensor,
    i2t_fused: torch.Tensor,
    t2i_ids: torch.Tensor,
    t2i_fused: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rebuild_target_logits` for some batch positions only (one data-parallel rank's share).

    ``i2t_rows`` (b, B) are the dual logits of batch images ``positions`` against every batch text,
    ``t2i_rows`` (b, B) those of batch texts ``positions`` against every batch image; the result is
    those rows of the full rebuild's (i2t, t2i).
    """
    b = len(positions)
    if i2t_rows.shape != (b, len(batch_texts)) or t2i_rows.shape != (b, len(batch_images)):
        raise ValueError(f"row logits {tuple(i2t_rows.shape)}, {tuple(t2i_rows.shape)} do not match {b} positions "
                         f"of a batch of {len(batch_images)} images and {len(batch_texts)} texts")
    if not torch.equal(_rows(text_image, batch_texts, batch_images.device), batch_images):
        raise ValueError("batch_texts are not captions of batch_images (text_image[batch_texts] != batch_images)")
    device = i2t_rows.device
    images, texts = batch_images.to(device), batch_texts.to(device)
    mine = positions.to(device)
    i2t = _overwrite(i2t_rows.float(), _rows(i2t_ids, images[mine], device), _rows(i2t_fused, images[mine], device),
                     texts)
    t2i = _overwrite(t2i_rows.float(), _rows(t2i_ids, texts[mine], device), _rows(t2i_fused, texts[mine], device),
                     images)
    return i2t, t2i


def candidates_in_batch(
    batch_images: torch.Tensor, batch_texts: torch.Tensor, i2t_ids: torch.Tensor, t2i_ids: torch.Tensor
) -> float:
    """Fraction of the batch anchors' cached candidates that are in the batch, both directions pooled.

    Stage 2 reports it: near zero means the fused targets are mostly unused (random batching),
    which is what neighbor-aware batching is there to prevent.
    """
    i2t = _rows(i2t_ids, batch_images, i2t_ids.device)
    t2i = _rows(t2i_ids, batch_texts, t2i_ids.device)
    hits = torch.isin(i2t, batch_texts.to(i2t.device)).sum() + torch.isin(t2i, batch_images.to(t2i.device)).sum()
    total = i2t.numel() + t2i.numel()
    return float(hits) / total if total else 0.0


def neighbor_batches(
    i2t_ids: torch.Tensor,
    text_image: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    neighbors: int | None = None,
) -> list[torch.Tensor]:
    """Image-row batches over one block, each image exactly once, anchors grouped with their candidates.

    Greedy: anchors in a random order; an unassigned anchor joins the current batch and pulls
    in the still-unassigned images of its top ``neighbors`` candidate texts while there is
    room; a full batch is flushed. Every batch has ``batch_size`` images except possibly the
    last. The walk is a Python loop over anchors (O(n k)); it runs once per block per epoch,
    off the per-step path.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = i2t_ids.shape[0]
    width = i2t_ids.shape[1] if neighbors is None else max(0, min(neighbors, i2t_ids.shape[1]))
    order = torch.randperm(n, generator=generator).tolist()
    cand = text_image.cpu()[i2t_ids[:, :width].cpu()].tolist()  # (n, width): candidate image rows
    assigned = bytearray(n)
    batches: list[torch.Tensor] = []
    current: list[int] = []
    for anchor in order:
        if assigned[anchor]:
            continue
        assigned[anchor] = 1
        current.append(anchor)
        for image in cand[anchor]:
            if len(current) >= batch_size:
                break
            if not assigned[image]:
                assigned[image] = 1
                current.append(image)
        if len(current) >= batch_size:
            batches.append(torch.tensor(current, dtype=torch.long))
            current = []
    if current:
        batches.append(torch.tensor(current, dtype=torch.long))
    return batches


def pick_texts(
    batch_images: torch.Tensor, first: torch.Tensor, count: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """One uniformly random caption row per image: ``first[i] + U{0, count[i] - 1}``."""
    images = batch_images.to(first.device)
    n_captions = count[images]
    if bool((n_captions < 1).any()):
        raise ValueError("an image in the batch has no caption")
    offset = (torch.rand(len(images), generator=generator).to(first.device) * n_captions).long()
    return first[images] + torch.minimum(offset, n_captions - 1)
