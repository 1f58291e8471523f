"""Evaluate the single-stream teacher: ITC retrieval, and ITM re-ranking of the ITC top-k.

Re-ranking is how a single-stream model retrieves in practice (ALBEF, BLIP):
scoring every pair costs N x T cross-attention passes, so the ITM head scores
only each query's top-k ITC candidates, which rank above all other candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from mcad_cache.teachers.single import SingleStreamTeacher
from pipeline.evaluation import flat_captions
from pipeline.retrieval import i2t_ranks, recall_table, rerank_rows, t2i_ranks
from pipeline.shards import SplitData


@torch.no_grad()
def evaluate_single_stream(
    teacher: SingleStreamTeacher,
    split: SplitData,
    ks: Sequence[int] = (1, 5, 10),
    rerank_k: int = 16,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Recall of the ITC embeddings alone (``itc``) and of ITM over the ITC top-k (``itm_rerank``)."""
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
    itc = recall_table(i2t_ranks(coarse, image_ids, image_of), t2i_ranks(coarse.t(), image_of), ks)

    progress = tqdm(total=(len(split.images) + len(texts)) * min(rerank_k, len(texts)), desc="itm rerank", unit="pair")

    def itm_scores(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(image_rows), batch_size):
            rows, cols = image_rows[s : s + batch_size], text_rows[s : s + batch_size]
            out.append(teacher.itm(vision[rows], text_batch.select(cols)).logits)
            progress.update(len(rows))
        return torch.cat(out)

    fine_i2t = rerank_rows(coarse, rerank_k, itm_scores)
    fine_t2i = rerank_rows(coarse.t(), rerank_k, lambda rows, cols: itm_scores(cols, rows))
    progress.close()
    rerank = recall_table(i2t_ranks(fine_i2t, image_ids, image_of), t2i_ranks(fine_t2i, image_of), ks)
    return {"itc": itc, "itm_rerank": rerank}
