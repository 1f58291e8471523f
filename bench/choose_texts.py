"""``choose_texts`` at stage-2 scale: the dense (B, k, B) formulation main had against today's gather/scatter one.

A synthetic block (``--images`` images with ``--captions`` captions each, k random candidate captions per image)
and its first neighbour batch of ``--batch`` rows, the batch `mcad distill --batching neighbor` would take: many
candidates' images share the batch, which is the case the caption choice exists for. Both formulations run on
the same rows and generator seed, are checked equal, and are timed interleaved (median of ``--repeats``), one
thread unless ``--threads`` says otherwise::

    python -m bench.choose_texts            # B=1024, k=32
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch


def choose_texts_dense(block, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The formulation ``mcad_student.data.choose_texts`` had before: a (B, k, B) match tensor (the reference)."""
    texts = block.first[rows] + (torch.rand(len(rows), generator=gen) * block.count[rows]).long()
    lists = block.lists["i2t/ids"][rows]  # (B, k) candidate caption rows of each anchor
    owners = block.text_image[lists]  # (B, k) their images
    match = owners[:, :, None] == rows[None, None, :]  # (B, k, B): anchor a's slot s names batch image j
    match &= ~torch.eye(len(rows), dtype=torch.bool)[:, None, :]  # an anchor does not pick its own caption
    flat = match.permute(2, 1, 0).reshape(len(rows), -1)  # (B, k*B): slot-major, so the best slot wins
    named = flat.any(1)
    first = flat.to(torch.uint8).argmax(1)
    slot, anchor = first // len(rows), first % len(rows)
    return torch.where(named, lists[anchor, slot], texts)


def synthetic_block(images: int, captions: int, k: int, seed: int = 0) -> SimpleNamespace:
    """What ``choose_texts`` reads of a ``Block``: caption ranges per image, caption -> image, i2t candidate lists."""
    gen = torch.Generator().manual_seed(seed)
    count = torch.full((images,), captions, dtype=torch.long)
    text_image = torch.arange(images).repeat_interleave(captions)
    lists = torch.randint(0, images * captions, (images, k), generator=gen)
    return SimpleNamespace(first=torch.cumsum(count, 0) - count, count=count, text_image=text_image,
                           lists={"i2t/ids": lists})


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    from mcad_cache.targets import neighbor_batches
    from mcad_student.data import choose_texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    block = synthetic_block(args.images, args.captions, args.k)
    rows = neighbor_batches(block.lists["i2t/ids"], block.text_image, args.batch, torch.Generator().manual_seed(1))[0]
    dense = choose_texts_dense(block, rows, torch.Generator().manual_seed(2))
    sparse = choose_texts(block, rows, torch.Generator().manual_seed(2))
    if not torch.equal(dense, sparse):
        raise SystemExit("the two formulations disagree")
    ways = {"dense (B, k, B)": choose_texts_dense, "gather/scatter": choose_texts}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        for name, way in ways.items():
            times[name].append(_timed(lambda way=way: way(block, rows, torch.Generator().manual_seed(2))))
    result = {name: round(1000 * statistics.median(t), 2) for name, t in times.items()}
    drawn = block.first[rows] + (torch.rand(len(rows), generator=torch.Generator().manual_seed(2))
                                 * block.count[rows]).long()
    taken = int((sparse != drawn).sum())
    print(f"choose_texts, B={len(rows)}, k={args.k}, {args.images} images x {args.captions} captions, "
          f"{args.threads} thread(s), median of {args.repeats}; {taken} of {len(rows)} captions differ from the "
          "random draw")
    print("| formulation | ms |\n|---|---:|")
    for name, ms in result.items():
        print(f"| {name} | {ms} |")
    return result


if __name__ == "__main__":
    main()
