"""Retrieval evaluation of any dual-stream model on an in-memory split.

A *dual-stream encoder* is anything with ``image_size``, ``pixels_from_uint8``,
``encode_images`` and ``encode_texts`` returning normalized embeddings: the
teacher adapters and the student both are one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from mcad_core.retrieval import dual_stream_ranks, recall_table
from mcad_core.shards import SplitData


class DualStreamEncoder(Protocol):
    image_size: int

    def pixels_from_uint8(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def flat_captions(split: SplitData) -> tuple[list[str], torch.Tensor]:
    """All captions in one list, with the image index of each."""
    texts = [text for captions in split.captions for text in captions]
    image_of = torch.repeat_interleave(
        torch.arange(len(split.captions)), torch.tensor([len(c) for c in split.captions])
    )
    return texts, image_of


@torch.no_grad()
def embed_split(
    model: DualStreamEncoder, split: SplitData, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    texts, image_of = flat_captions(split)
    images = torch.cat(
        [
            model.encode_images(model.pixels_from_uint8(split.images[s : s + batch_size])).cpu()
            for s in range(0, len(split.images), batch_size)
        ]
    )
    text_emb = torch.cat(
        [model.encode_texts(texts[s : s + batch_size]).cpu() for s in range(0, len(texts), batch_size)]
    )
    return images, text_emb, image_of


def evaluate_dual_stream(
    model: DualStreamEncoder, split: SplitData, ks: Sequence[int] = (1, 5, 10), batch_size: int = 256
) -> dict[str, float]:
    image_emb, text_emb, image_of = embed_split(model, split, batch_size)
    return recall_table(*dual_stream_ranks(image_emb, text_emb, image_of), ks)
