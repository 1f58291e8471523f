"""Recall@K for image-text retrieval, computed from score rows in blocks.

Conventions (the standard COCO/Flickr30k protocol):

- image-to-text: an image query is a hit at K if *any* of its captions is among
  the K best-scored texts;
- text-to-image: a text query is a hit at K if its own image is among the K
  best-scored images.

Ranks are pessimistic: a wrong candidate that *ties* the best right one counts
as ranked above it, so a model that scores everything equally gets no credit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

Direction = str  # "i2t" or "t2i"


def i2t_ranks(scores: torch.Tensor, image_rows: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """Rank of the best-scored caption for each image query.

    ``scores``: (B, T) image-query rows; ``image_rows``: (B,) the queries' image ids;
    ``text_to_image``: (T,) the image id of every text.
    """
    positive = text_to_image[None, :] == image_rows[:, None]
    if not bool(positive.any(1).all()):
        raise ValueError("every image query needs at least one caption among the texts")
    best_positive = scores.masked_fill(~positive, float("-inf")).max(1).values
    return ((scores >= best_positive[:, None]) & ~positive).sum(1)


def t2i_ranks(scores: torch.Tensor, target_images: torch.Tensor) -> torch.Tensor:
    """Rank of the right image for each text query. ``scores``: (B, N); ``target_images``: (B,)."""
    positive_score = scores.gather(1, target_images[:, None])
    wrong = torch.ones_like(scores, dtype=torch.bool).scatter_(1, target_images[:, None], False)
    return ((scores >= positive_score) & wrong).sum(1)


def recall_from_ranks(ranks: torch.Tensor, ks: Iterable[int]) -> dict[int, float]:
    return {k: 100.0 * float((ranks < k).float().mean()) for k in ks}


def recall_table(i2t: torch.Tensor, t2i: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Flat metrics: ``i2t_R@1`` ... ``t2i_R@10`` and ``mean_recall`` (the mean of all six)."""
    table = {f"i2t_R@{k}": v for k, v in recall_from_ranks(i2t, ks).items()}
    table.update({f"t2i_R@{k}": v for k, v in recall_from_ranks(t2i, ks).items()})
    table["mean_recall"] = sum(table.values()) / len(table)
    return table


def dual_stream_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """i2t and t2i ranks from normalized embeddings, never holding more than ``block`` score rows."""
    n_images = image_emb.shape[0]
    i2t = torch.cat(
        [
            i2t_ranks(image_emb[s : s + block] @ text_emb.t(), torch.arange(s, min(s + block, n_images)), text_to_image)
            for s in range(0, n_images, block)
        ]
    )
    t2i = torch.cat(
        [
            t2i_ranks(text_emb[s : s + block] @ image_emb.t(), text_to_image[s : s + block])
            for s in range(0, text_emb.shape[0], block)
        ]
    )
    return i2t, t2i


def place_fine(coarse: torch.Tensor, top: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """``coarse`` with the ``top`` (rows, k) candidates re-scored by ``fine`` (rows, k), ranked above the rest.

    The fine scores enter as their dense ranks (same order, same ties) above ``coarse.max()``, in float64:
    shifting fine below coarse by arithmetic would lose the coarse order in rounding when fine is large.
    """
    dense = torch.unique(fine, return_inverse=True)[1]
    coarse = coarse.double()
    return coarse.scatter(1, top, coarse.max() + 1.0 + dense.double())
