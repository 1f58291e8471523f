"""Stage-2 input that streams: the next block read in the background, memory that does not grow with the block.

Figures (``measure()``, for ``bench.scale`` to report):

- ``stage2_batch_after_block_switch_ratio``: how long the loop waits in ``next(batches)`` for the first batch of
  a block, over a steady batch's wait (medians; the run's very first batch, which nothing can read ahead of, is
  left out), on the store with blocks of 2 shards over two epochs. The consumer sleeps ``step_s`` per batch, as
  the host does while a GPU step runs, so a block read in the background has that time to finish. The same run
  without the read-ahead (``prefetch=False``) is reported beside it. Goal <= 1.2.
- ``stage2_rss_block_8_over_block_2``: peak RSS of a process that runs the stage-2 data path (``CacheBatches``
  as ``mcad distill`` builds it, one epoch and the next epoch's first batch, no model) on a store with blocks of
  8 shards, over the same on a store with blocks of 2 shards; the shards are the same. Goal <= 1.2.

Each configuration runs in a process of its own (one torch thread), so the peaks are independent; the peak is
the process's VmHWM. The stores are real ones: generated shards (JPEG, ``image_size`` px, stage 2 decoding them
at ``source_size``) cached by stage 1 with tiny random-init teachers (tests/conftest.py's shapes: an open_clip
CLIP and a BLIP ITM, 32 px inputs), 2 views, k 5.

    python -m bench.scale_stream [--quick] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import tiny_teachers

GOALS = {"stage2_batch_after_block_switch_ratio": 1.2, "stage2_rss_block_8_over_block_2": 1.2}  # at most
FULL = {"shards": 16, "per_shard": 128, "image_size": 224, "source_size": 224, "batch_size": 64, "step_s": 0.05}
QUICK = {"shards": 8, "per_shard": 32, "image_size": 96, "source_size": 96, "batch_size": 16, "step_s": 0.03}


def make_stores(root: Path, setup: dict, block_shards: tuple[int, ...]) -> dict[int, Path]:
    """One complete stage-1 store per blocking of the same generated shards."""
    from bench.scale import make_world
    from mcad_cache.config import CacheConfig
    from mcad_cache.job import PASSES, run_cache
    from mcad_core.dist import explicit_place

    shards_dir, tokenizer_dir = make_world(root, setup["shards"], setup["per_shard"], setup["image_size"])
    dual, single = tiny_teachers(tokenizer_dir, root)
    stores = {}
    for blocks in block_shards:
        cfg = CacheConfig(shards=str(shards_dir), store=root / f"blocks{blocks}.zarr", teachers_dir=None,
                          dual=(dual,), single=single, tokenizer=str(tokenizer_dir), source_size=setup["source_size"],
                          views=2, k=5, block_shards=blocks, batch_size=128, itm_batch_size=256, integration_dim=8,
                          integration_steps=5, device="cpu", threads=1)
        run_cache(cfg, PASSES, explicit_place(0, 1), progress=False)
        stores[blocks] = cfg.store
    return stores


# ---------------------------------------------------------------------- the child processes


def _stream(store: str, batch_size: int, prefetch: bool = True):
    from mcad_student.data import CacheBatches

    # As `mcad distill` builds it (fused_kd, no source images), with neighbour batches: the plan a block switch makes.
    return CacheBatches(store, batch_size, 32, seed=0, fused=True, batching="neighbor", sources=False,
                        prefetch=prefetch)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB: "VmRSS" (resident now) or "VmHWM" (the peak so far).

    VmHWM, not ``getrusage``'s ru_maxrss: Linux carries the parent's peak over into a child's ru_maxrss across
    fork and exec, so a child of a large parent would report the parent's peak.
    """
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def child_rss(store: str, batch_size: int) -> dict:
    """Peak RSS of one epoch of batches and the next epoch's first (so a read-ahead crosses the epoch)."""
    from mcad_student.data import Position

    stream = _stream(store, batch_size)
    before = _status_mb("VmRSS")
    batches = stream.iter_from(Position())
    n = stream.batches_per_epoch() + 1
    for _ in range(n):
        next(batches)
    batches.close()
    peak = _status_mb("VmHWM")
    return {"peak_rss_mb": round(peak, 1), "rss_before_first_block_mb": round(before, 1),
            "data_path_mb": round(peak - before, 1), "batches": n, "blocks": stream.n_blocks,
            "images_per_block": max(stream.block_sizes())}


def child_time(store: str, batch_size: int, step_s: float, epochs: int, prefetch: bool = True) -> dict:
    """Waits in ``next(batches)`` per batch, the consumer sleeping ``step_s`` after each (a device step)."""
    from mcad_student.data import Position

    stream = _stream(store, batch_size, prefetch)
    batches = stream.iter_from(Position())
    waits, blocks = [], []
    for _ in range(epochs * stream.batches_per_epoch()):
        start = time.perf_counter()
        position, batch = next(batches)
        waits.append(time.perf_counter() - start)
        blocks.append((position.epoch, batch["block"]))
        time.sleep(step_s)
    batches.close()
    first = [i for i in range(1, len(waits)) if blocks[i] != blocks[i - 1]]  # a block's first batch
    steady = [waits[i] for i in range(1, len(waits)) if i not in first]
    switch = [waits[i] for i in first]
    return {"first_batch_of_run_s": round(waits[0], 4), "block_switches": len(switch),
            "first_batch_of_block_s": round(statistics.median(switch), 4),
            "steady_batch_s": round(statistics.median(steady), 4),
            "ratio": statistics.median(switch) / statistics.median(steady), "step_s": step_s,
            "switch_waits_s": [round(w, 4) for w in switch]}


def _in_child(*args: str) -> dict:
    """Run ``python -m bench.scale_stream --child ...`` (one torch thread, no progress bars); its JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-m", "bench.scale_stream", "--child", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"bench.scale_stream child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the figures


def measure(quick: bool = False, work_dir: Path | None = None) -> dict:
    """Both figures (see the module docstring) and the raw numbers they come from.

    ``work_dir``: where the shards and stores go and stay, reused by a later call (None: a temporary directory).
    """
    setup = dict(QUICK if quick else FULL)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        os.environ.setdefault("XDG_CACHE_HOME", str(root / "xdg"))  # shard fingerprints stay with the shards
        stores = {blocks: root / f"blocks{blocks}.zarr" for blocks in (2, 8)}
        if not all((store / "zarr.json").exists() for store in stores.values()):
            stores = make_stores(root, setup, tuple(stores))
        batch = str(setup["batch_size"])
        rss = {blocks: _in_child("rss", str(store), batch) for blocks, store in stores.items()}
        epochs = "2"
        timing = _in_child("time", str(stores[2]), batch, str(setup["step_s"]), epochs, "1")
        no_prefetch = _in_child("time", str(stores[2]), batch, str(setup["step_s"]), epochs, "0")
    return {
        "stage2_batch_after_block_switch_ratio": round(timing["ratio"], 3),
        "stage2_rss_block_8_over_block_2": round(rss[8]["peak_rss_mb"] / rss[2]["peak_rss_mb"], 3),
        "goals_at_most": GOALS,
        "setup": {**setup, "quick": quick, "cpu_count": os.cpu_count()},
        "details": {"rss_block_2": rss[2], "rss_block_8": rss[8], "timing_block_2": timing,
                    "timing_block_2_without_prefetch": no_prefetch},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--work-dir", type=Path, help="keep the shards and stores here and reuse them")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, store, batch, *rest = args.child
        import torch

        torch.set_num_threads(1)
        result = (child_rss(store, int(batch)) if kind == "rss"
                  else child_time(store, int(batch), float(rest[0]), int(rest[1]), rest[2] == "1"))
        print(json.dumps(result))
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(json.dumps(measure(args.quick, args.work_dir), indent=2))


if __name__ == "__main__":
    main()
