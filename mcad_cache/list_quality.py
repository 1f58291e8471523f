"""How well each cached score ranks the true pairs inside the cached top-k lists (`mcad cache-info --lists`).

The fused targets can only teach the student something the dual-stream targets do not when the single-stream
teacher ranks an anchor's candidates differently, and better, than the dual-stream teachers do. The store
already holds what that takes: each anchor's candidate ids, their dual, ITM and fused scores, and which image
every caption belongs to. So for every score and direction this counts the anchors whose top-scored candidate
is a true pair (image-to-text: one of the image's captions; text-to-image: the caption's image), beside the
anchors whose list holds a true pair at all (what any rescoring of the list is bounded by). An ITM column no
higher than the dual one says the fused targets carry no extra ranking signal on this data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

SCORES = ("dual", "itm", "fused")
DIRECTIONS = ("i2t", "t2i")


def truth_table(direction: str, ids: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """(anchors, k) bool: candidate ``ids[a, c]`` is a true pair of anchor ``a``.

    ``text_image[j]`` is caption ``j``'s image row in the block; i2t anchors are image rows with caption
    candidates, t2i anchors are caption rows with image candidates.
    """
    if direction == "i2t":
        return text_image[ids] == np.arange(len(ids))[:, None]
    if direction == "t2i":
        return ids == text_image[:, None]
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def count_block(lists: Mapping[str, np.ndarray], text_image: np.ndarray) -> dict[str, dict[str, int]]:
    """Integer counts for one block: per direction, ``anchors``, ``in_list`` and ``top1_<score>``.

    ``lists`` maps ``"<direction>/ids"`` and ``"<direction>/<score>"`` to the block's arrays; a score the
    store lacks is left out. Ties in a score count the first candidate (the list's own order).
    """
    out = {}
    for direction in DIRECTIONS:
        ids = np.asarray(lists[f"{direction}/ids"])
        truth = truth_table(direction, ids, np.asarray(text_image))
        rows = np.arange(len(ids))
        counts = {"anchors": len(ids), "in_list": int(truth.any(axis=1).sum())}
        for score in SCORES:
            key = f"{direction}/{score}"
            if key in lists:
                counts[f"top1_{score}"] = int(truth[rows, np.asarray(lists[key]).argmax(axis=1)].sum())
        out[direction] = counts
    return out


def summarize(blocks: Iterable[dict[str, dict[str, int]]]) -> dict[str, dict[str, float | int]]:
    """Pool the blocks' counts (anchor-weighted) into shares per direction: ``in_list``, ``top1_<score>``."""
    totals: dict[str, dict[str, int]] = {}
    for block in blocks:
        for direction, counts in block.items():
            into = totals.setdefault(direction, {})
            for name, value in counts.items():
                into[name] = into.get(name, 0) + value
    return {direction: {"anchors": c["anchors"],
                        **{name: round(v / c["anchors"], 4) for name, v in c.items() if name != "anchors"}}
            for direction, c in totals.items() if c["anchors"]}
