"""Write a shard split in clip_benchmark's webdataset *retrieval* layout.

``clip_benchmark eval --dataset wds/NAME --dataset_root DIR --split SPLIT --task zeroshot_retrieval`` reads
(``clip_benchmark.datasets.builder.build_wds_dataset``)::

    DIR/dataset_type.txt          "retrieval" (without it clip_benchmark reads the tars as classification)
    DIR/SPLIT/nshards.txt         the number n of shards
    DIR/SPLIT/0.tar .. n-1.tar    one sample per image: KEY.png (the image) and KEY.txt (its captions, one a line)

plus, ignored by clip_benchmark, ``KEY.json`` in each sample (the source shard and key) and
``DIR/mcad_source.json`` (the source shards and counts). No classnames or zero-shot templates
are needed for retrieval.

Images are the decoded RGB pixels written as lossless PNG, so clip_benchmark decodes exactly
the pixels that ``mcad_core.shards`` (and so ``mcad eval``) sees. Captions are the ones
``mcad_core.shards`` reads (``json["captions"]``, else ``txt``), stripped; clip_benchmark splits
the ``.txt`` with ``str.splitlines``, so a caption holding a line boundary (``\\n``, ``\\r``,
``\\x0b``, ``\\x85``, ``\\u2028``, ...) would become several captions: it is refused, not escaped.
Sample keys are ``s%07d`` by position (clip_benchmark's own convention), which keeps
webdataset's grouping of tar members by key safe whatever the source keys are.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds

from mcad_core.atomic import atomic_dir
from mcad_core.shards import ErrorPolicy, ReadStats, iter_samples

DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
SOURCE_JSON = "mcad_source.json"
RETRIEVAL = "retrieval"
IMAGE_EXT = "png"


def caption_text(captions: Sequence[str], key: str = "?") -> str:
    """The ``.txt`` payload: captions one a line, each must read back unchanged through ``str.splitlines``."""
    if not captions:
        raise ValueError(f"sample {key} has no caption")
    for caption in captions:
        if caption.splitlines() != [caption]:
            raise ValueError(f"caption of sample {key} is empty or holds a line boundary "
                             f"(clip_benchmark would split it): {caption!r}")
    return "\n".join(captions)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_retrieval_layout(shards: Sequence[str], out_dir: str | Path, split: str = "test",
                           max_count: int = 10_000, policy: ErrorPolicy = "raise") -> dict:
    """Write ``shards`` (read with ``mcad_core.shards``) to ``out_dir`` in the layout above; return its summary.

    ``out_dir`` is replaced as a whole, atomically: readers see the old layout or the new one.
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    stats = ReadStats()
    n_images = n_texts = 0
    with atomic_dir(out_dir) as tmp:
        (tmp / DATASET_TYPE).write_text(RETRIEVAL + "\n")
        split_dir = tmp / split
        split_dir.mkdir(parents=True)
        sink: wds.TarWriter | None = None
        n_shards = 0
        for index, sample in enumerate(iter_samples(list(shards), policy=policy, stats=stats)):
            if index % max_count == 0:
                if sink is not None:
                    sink.close()
                sink = wds.TarWriter(str(split_dir / f"{n_shards}.tar"), encoder=False, mtime=0.0)
                n_shards += 1
            source = {"key": sample.key, "shard": sample.shard}
            sink.write({
                "__key__": f"s{index:07d}",
                IMAGE_EXT: png_bytes(sample.image),
                "txt": caption_text(sample.captions, sample.key).encode("utf-8"),
                "json": json.dumps(source).encode("utf-8"),
            })
            n_images += 1
            n_texts += len(sample.captions)
        if sink is not None:
            sink.close()
        if n_images == 0:
            raise ValueError(f"no samples read from {len(shards)} shard(s)")
        (split_dir / NSHARDS).write_text(f"{n_shards}\n")
        summary = {"split": split, "n_images": n_images, "n_texts": n_texts, "n_shards": n_shards,
                   "source_shards": list(shards), "skipped": dict(stats.by_reason)}
        (tmp / SOURCE_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
