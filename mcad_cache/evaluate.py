"""Evaluate the single-stream teacher: ITC retrieval, and ITM re-ranking of the ITC top-k.

Re-ranking is how a single-stream model retrieves in practice (ALBEF, BLIP):
scoring every pair costs N x T cross-attention passes, so the ITM head scores
only each query's top-k ITC candidates, which rank above all other candidates.
Two re-ranking scores are reported from the same ITM passes:

- ``itm_rerank``: the ITM logit alone (ALBEF's evaluation);
- ``itm_itc_rerank``: the ITM logit plus the candidate's ITC logit, cosine / tau
  (BLIP's evaluation adds ITM and ITC scores). Both are logits, so the sum is
  a product of the two heads' experts; tau is the temperature the teacher's ITC
  was trained at (``SingleStreamTeacher.itc_temperature``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from mcad_cache.teachers.single import SingleStreamTeacher
from mcad_core.evaluation import flat_captions
from mcad_core.retrieval import i2t_ranks, place_fine, recall_table, t2i_ranks
from mcad_core.shards import SplitData


@torch.no_grad()
def evaluate_single_stream(
    teacher: SingleStreamTeacher,
    split: SplitData,
    ks: Sequence[int] = (1, 5, 10),
    rerank_k: int = 16,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Recall of ITC alone (``itc``), of ITM over the ITC top-k (``itm_rerank``) and of ITM + ITC there
    (``itm_itc_rerank``)."""
    texts, image_of = flat_captions(split)
    text_batch = teacher.tokenize(texts)
    vision = torch.cat(
        [
            teacher.vision_tokens(teacher.pixels_from_uint8(split.images[s : s + batch_size]))
            for s in range(0, len(split.images), batch_size)
        ]
    )
    image_emb = teacher.itc_images(vision)
    text_emb = torch.cat(
        [teacher.itc_texts(text_batch.select(torch.arange(s, min(s + batch_size, len(texts)))))
         for s in range(0, len(texts), batch_size)]
    )
    coarse = image_emb @ text_emb.t()
    image_ids = torch.arange(len(split.images))

    def table(i2t: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
        return recall_table(i2t_ranks(i2t, image_ids, image_of), t2i_ranks(t2i, image_of), ks)

    top_texts = coarse.topk(min(rerank_k, len(texts)), dim=1).indices  # (N, k): each image's candidate captions
    top_images = coarse.t().topk(min(rerank_k, len(image_ids)), dim=1).indices  # (T, k'): each caption's images
    progress = tqdm(total=top_texts.numel() + top_images.numel(), desc="itm rerank", unit="pair")

    def itm_scores(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(image_rows), batch_size):
            rows, cols = image_rows[s : s + batch_size], text_rows[s : s + batch_size]
            out.append(teacher.itm(vision, text_batch.select(cols), image_rows=rows).logits)
            progress.update(len(rows))
        return torch.cat(out)

    itm_i2t = itm_scores(image_ids.repeat_interleave(top_texts.shape[1]), top_texts.reshape(-1))
    itm_t2i = itm_scores(top_images.reshape(-1), torch.arange(len(texts)).repeat_interleave(top_images.shape[1]))
    itm_i2t, itm_t2i = itm_i2t.view(top_texts.shape), itm_t2i.view(top_images.shape)
    progress.close()
    itc_i2t = coarse.gather(1, top_texts) / teacher.itc_temperature
    itc_t2i = coarse.t().gather(1, top_images) / teacher.itc_temperature
    return {
        "itc": table(coarse, coarse.t()),
        "itm_rerank": table(place_fine(coarse, top_texts, itm_i2t), place_fine(coarse.t(), top_images, itm_t2i)),
        "itm_itc_rerank": table(place_fine(coarse, top_texts, itm_i2t + itc_i2t),
                                place_fine(coarse.t(), top_images, itm_t2i + itc_t2i)),
    }
