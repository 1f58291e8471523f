"""Stage 1 at scale, side by side in one run: worker processes, shared renders, bf16 teachers.

Figures (bench/results/scale.{json,md}):

- ``stage1_noop_teacher_speedup_2_workers``: samples/s of the embed pass (``mcad_cache.job.embed_pass``: read,
  views, teacher calls, store writes) with 2 worker processes over 1, on generated shards, with no-op teachers
  (two dual-stream teachers and a single-stream one whose forwards return zeros of the right shape), so
  what is measured is everything of stage 1 but the forwards. The reader thread (``workers`` 0) is run
  beside them for reference. Runs alternate between the worker counts, one round after another; the figure is
  the median over rounds of each round's 2-worker rate over its 1-worker rate (paired, side by side; the
  ratio of the medians is reported too).
- ``stage1_renders_per_sample_30_views_2_teachers``: image renders (``render_views`` rows) per sample of one
  shard's embed with 30 views, two dual-stream teachers and the single-stream one, all at one input size
  (view 0 only for the single-stream teacher, the default). A tower-by-tower loop renders 2 x 30 + 1.
- ``bf16_embedding_cosine_min``: the lowest cosine, over every stored embedding row, between stores embedded
  with ``precision`` amp-bf16 and fp32, with tiny random-init teachers (tests/conftest.py's shapes) on the CPU.
- ``block_pass_2_tasks_identical``, ``block_pass_2_tasks_wall_ratio``, ``integrate_rss_8_blocks_over_2_blocks``:
  the block passes split over 2 tasks against 1, and integrate's memory (``bench/scale_blocks.py``).
- ``stage2_batch_after_block_switch_ratio``, ``stage2_rss_block_8_over_block_2``: stage 2's block switch and
  memory (``bench/scale_stream.py``).

    python -m bench.scale [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import Figure, machine, markdown_table, publish, quiet_progress, rounded

NAME = "scale"
GOALS = {"stage1_noop_teacher_speedup_2_workers": 1.8, "stage1_renders_per_sample_30_views_2_teachers": 30,
         "bf16_embedding_cosine_min": 0.999, "stage2_choose_texts_ms_b1024_k32": 20,
         "block_pass_2_tasks_identical": True, "block_pass_2_tasks_wall_ratio": 0.6,
         "integrate_rss_8_blocks_over_2_blocks": 1.2, "stage2_batch_after_block_switch_ratio": 1.2,
         "stage2_rss_block_8_over_block_2": 1.2}
AT_MOST = ("stage1_renders_per_sample_30_views_2_teachers", "stage2_choose_texts_ms_b1024_k32",
           "block_pass_2_tasks_wall_ratio", "integrate_rss_8_blocks_over_2_blocks",
           "stage2_batch_after_block_switch_ratio", "stage2_rss_block_8_over_block_2")  # lower is better
UNITS = {"stage1_noop_teacher_speedup_2_workers": "x", "stage1_renders_per_sample_30_views_2_teachers": "renders/sample",
         "bf16_embedding_cosine_min": "cosine", "stage2_choose_texts_ms_b1024_k32": "ms",
         "block_pass_2_tasks_identical": "bool", "block_pass_2_tasks_wall_ratio": "x",
         "integrate_rss_8_blocks_over_2_blocks": "x", "stage2_batch_after_block_switch_ratio": "x",
         "stage2_rss_block_8_over_block_2": "x"}


# ---------------------------------------------------------------------- no-op teachers


class NoopDual:
    """A dual-stream teacher whose forwards return zeros: its own tokenizer and pixel preparation, no model."""

    def __init__(self, name: str, tokenizer, image_size: int, dim: int = 768, context: int = 77):
        import torch

        self.name, self.tokenizer, self.image_size, self.dim, self.context = name, tokenizer, image_size, dim, context
        self.mean = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)

    embed_dim = property(lambda self: self.dim)
    logit_scale = property(lambda self: 100.0)

    def identity(self):
        from mcad_cache.teachers.identity import TeacherIdentity

        return TeacherIdentity("dual", f"noop:{self.name}", None, "0" * 64)

    def pixels_from_uint8(self, images):
        from mcad_core.views import normalize_uint8

        return normalize_uint8(images, self.mean, self.std, self.image_size)

    def tokenize(self, texts):
        import torch

        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context,
                             return_tensors="np")["input_ids"]
        return torch.from_numpy(ids)

    def encode_images(self, pixels):
        import torch

        return torch.zeros(len(pixels), self.dim)

    def encode_texts(self, tokens):
        import torch

        return torch.zeros(len(tokens), self.dim)


class NoopSingle(NoopDual):
    """The single-stream side: BLIP-like tokens (padded to 512), zero vision tokens and ITC embeddings."""

    def __init__(self, tokenizer, image_size: int, dim: int = 256):
        from mcad_cache.teachers.single import SingleTeacherSpec

        super().__init__("single", tokenizer, image_size, dim, context=512)
        self.spec = SingleTeacherSpec("noop-single", "noop")

    fused_dim = property(lambda self: 768)
    itc_temperature = property(lambda self: 1.0)

    def identity(self):
        from mcad_cache.teachers.identity import TeacherIdentity

        return TeacherIdentity("single", "noop-single", None, "0" * 64)

    def tokenize(self, texts):
        from mcad_cache.teachers.single import TextBatch

        encoded = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context,
                                 return_tensors="pt")
        return TextBatch(encoded["input_ids"], encoded["attention_mask"])

    def vision_tokens(self, pixels):
        import torch

        return torch.zeros(len(pixels), 1, 8)

    def itc_images(self, tokens):
        import torch

        return torch.zeros(len(tokens), self.dim)

    def itc_texts(self, text):
        import torch

        return torch.zeros(len(text), self.dim)


class HandOff:
    """A no-op teacher that does not normalize either: what a GPU-resident teacher leaves on the host CPU."""

    def pixels_from_uint8(self, images):
        return images


class HandOffDual(HandOff, NoopDual):
    pass


class HandOffSingle(HandOff, NoopSingle):
    pass


def noop_teachers(tokenizer, tokenizer_path: str, image_size: int, single_size: int | None = None,
                  normalize: bool = True):
    """Two no-op dual-stream teachers and a no-op single-stream one; ``normalize``: each prepares its pixels on
    the CPU as a real teacher on the CPU does (float32, mean and std), else hands the uint8 renders on as they are."""
    from mcad_cache.embed import TeacherSet

    dual, single = (NoopDual, NoopSingle) if normalize else (HandOffDual, HandOffSingle)
    duals = {"noop_a": dual("a", tokenizer, image_size), "noop_b": dual("b", tokenizer, image_size)}
    return TeacherSet(duals, "noop_single", single(tokenizer, single_size or image_size), tokenizer,
                      tokenizer_path, 77, "cpu")


# ---------------------------------------------------------------------- inputs


def make_world(root: Path, shards: int, per_shard: int, image_size: int) -> tuple[Path, Path]:
    """Generated train shards (JPEG, ``image_size`` px) and a WordPiece tokenizer trained on their captions."""
    from mcad_core.shards import iter_samples, list_shards
    from mcad_world.synth import WorldConfig, generate
    from mcad_world.tokenizer import train_wordpiece

    world = root / "world"
    generate(world, WorldConfig(seed=0, image_size=image_size, n_train=shards * per_shard, n_val=1, n_test=1,
                                samples_per_shard=per_shard), progress=False)
    captions = [c for s in iter_samples(list_shards(world / "train")[:1]) for c in s.captions]
    tokenizer = root / "tokenizer"
    train_wordpiece(captions, tokenizer, vocab_size=256)
    return world / "train", tokenizer


# ---------------------------------------------------------------------- measurements


def embed_rate(shards: list[str], teachers, cfg, workers: int) -> dict:
    """One embed pass over ``shards`` into a fresh store: samples per second, reading included."""
    from mcad_cache.embed import build_manifest
    from mcad_cache.job import CacheSummary, embed_pass
    from mcad_cache.store import CacheStore
    from mcad_core.dist import explicit_place

    import resource

    def cpu(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    with tempfile.TemporaryDirectory() as tmp:
        run = replace(cfg, store=Path(tmp) / "s.zarr", workers=workers)
        store = CacheStore.create_or_open(run.store, build_manifest(run, teachers, shards))
        summary = CacheSummary(str(run.store), explicit_place(0, 1))
        load = os.getloadavg()[0]
        main_cpu, worker_cpu = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)  # workers: once joined
        start = time.perf_counter()
        embed_pass(store, run, teachers, shards, summary, progress=False)
        seconds = time.perf_counter() - start
        main_cpu, worker_cpu = cpu(resource.RUSAGE_SELF) - main_cpu, cpu(resource.RUSAGE_CHILDREN) - worker_cpu
    return {"workers": workers, "seconds": round(seconds, 3), "samples": summary.samples,
            "samples_per_s": round(summary.samples / seconds, 2), "main_cpu_s": round(main_cpu, 2),
            "workers_cpu_s": round(worker_cpu, 2), "cores_busy": round((main_cpu + worker_cpu) / seconds, 2),
            "load_average_1min_before": round(load, 2)}


def worker_speedup(shards: list[str], teachers, cfg, repeats: int, counts: tuple[int, ...] = (1, 2, 0)) -> dict:
    """Embed passes alternating over the worker ``counts`` (0: the reader thread), ``repeats`` rounds."""
    runs = []
    for _ in range(repeats):
        for workers in counts:
            runs.append(embed_rate(shards, teachers, cfg, workers))
    rate = {w: statistics.median(r["samples_per_s"] for r in runs if r["workers"] == w) for w in counts}
    by_round = [runs[i:i + len(counts)] for i in range(0, len(runs), len(counts))]
    paired = [next(r["samples_per_s"] for r in round_ if r["workers"] == 2)
              / next(r["samples_per_s"] for r in round_ if r["workers"] == 1) for round_ in by_round]
    out = {"runs": runs, "median_samples_per_s": {str(w): v for w, v in rate.items()},
           "speedup_2_over_1_per_round": [round(v, 3) for v in paired],
           "speedup_2_over_1": statistics.median(paired), "speedup_2_over_1_of_medians": rate[2] / rate[1]}
    if 0 in rate:
        out["speedup_2_over_thread"] = rate[2] / rate[0]
    return out


def renders_per_sample(shard: str, teachers, cfg, views: int) -> dict:
    """``render_views`` rows per sample of one shard's embed with ``views`` views."""
    from mcad_cache import embed

    rows = []
    render = embed.render_views

    def counting(images, boxes, size):
        rows.append(len(images))
        return render(images, boxes, size)

    run = replace(cfg, views=views)
    shard_input = embed.read_shard(shard, run, teachers)
    embed.render_views = counting
    try:
        embed.embed_input(shard_input, run, teachers)
    finally:
        embed.render_views = render
    samples = len(shard_input.data)
    tower_by_tower = len(teachers.duals) * views + (views if run.single_itc_views == "all" else 1)
    return {"views": views, "samples": samples, "renders_per_sample": sum(rows) / samples,
            "tower_by_tower_renders_per_sample": tower_by_tower}


def bf16_cosine(shards_dir: Path, tokenizer_dir: Path, root: Path) -> dict:
    """Lowest cosine between amp-bf16 and fp32 stored embeddings, tiny random-init teachers (as tests use)."""
    import numpy as np

    from bench.common import tiny_teachers
    from mcad_cache.config import CacheConfig
    from mcad_cache.job import run_cache
    from mcad_cache.store import CacheStore
    from mcad_core.dist import explicit_place

    clip_name, blip_name = tiny_teachers(tokenizer_dir, root)
    size = 32  # the tiny teachers' input size
    subset = root / "bf16_shards"
    subset.mkdir()
    for shard in sorted(shards_dir.glob("*.tar"))[:2]:
        (subset / shard.name).symlink_to(shard.resolve())
    base = CacheConfig(shards=str(subset), store=root / "fp32.zarr", teachers_dir=None, dual=(clip_name,),
                       single=blip_name, tokenizer=str(tokenizer_dir), source_size=size, views=2, k=5,
                       block_shards=2, batch_size=64, device="cpu")
    stores = {}
    for precision in ("fp32", "amp-bf16"):
        cfg = replace(base, store=root / f"{precision}.zarr", precision=precision)
        run_cache(cfg, ["embed"], explicit_place(0, 1), progress=False)
        stores[precision] = CacheStore.open(cfg.store)
    lowest: dict[str, float] = {}
    rows = 0
    for name in stores["fp32"].root["shards"].group_keys():
        a, b = stores["fp32"].shard_group(name)["emb"], stores["amp-bf16"].shard_group(name)["emb"]
        for path, array in a.members(max_depth=None):
            if not hasattr(array, "dtype"):
                continue
            x = array[...].astype(np.float32).reshape(-1, array.shape[-1])
            y = b[path][...].astype(np.float32).reshape(-1, array.shape[-1])
            cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            lowest[path] = min(lowest.get(path, 1.0), float(cosine.min()))
            rows += len(x)
    return {"min_cosine": min(lowest.values()), "per_array": lowest, "rows": rows,
            "teachers": "tiny random-init open_clip CLIP + BLIP ITM (width 32, 1 layer, 32 px), 2 views, 2 shards"}


# ---------------------------------------------------------------------- report


def figures(results: dict) -> list[Figure]:
    out = []
    for name, goal in GOALS.items():
        value = results.get(name)
        if isinstance(goal, bool):
            met, target = (None if value is None else value is goal), str(goal).lower()
        else:
            met = None if value is None else (value <= goal if name in AT_MOST else value >= goal)
            target = ("<= " if name in AT_MOST else ">= ") + str(goal)
        out.append(Figure(NAME, name, value, UNITS[name], target, met))
    return out


def markdown(results: dict) -> str:
    speed, renders, setup = results["details"]["workers"], results["details"]["renders"], results["setup"]
    hand_off = results["details"]["workers_no_cpu_normalization"]
    rows = [[f.name, f.value, f.target, {True: "met", False: "**missed**", None: "-"}[f.met]]
            for f in map(lambda d: Figure(**d), results["figures"])]
    runs = [[r["workers"] or "0 (reader thread)", r["samples"], r["seconds"], r["samples_per_s"], r["main_cpu_s"],
             r["workers_cpu_s"], r["cores_busy"], r["load_average_1min_before"]] for r in speed["runs"]]
    return "\n\n".join([
        "# Stage 1 at scale",
        f"`python -m bench.scale`: {setup['shards']} generated shards of {setup['per_shard']} JPEGs "
        f"({setup['image_size']} px, resized to {setup['source_size']}), {setup['cpu_count']} CPU cores, "
        f"torch threads {setup['threads']} in the main process. {setup['note']}",
        markdown_table(["figure", "measured", "goal", ""], rows),
        "## Embed pass with no-op teachers (everything but the forwards)",
        f"Median samples/s: 1 worker {speed['median_samples_per_s']['1']:.1f}, 2 workers "
        f"{speed['median_samples_per_s']['2']:.1f}, the reader thread {speed['median_samples_per_s']['0']:.1f}; "
        f"2 workers / reader thread {speed['speedup_2_over_thread']:.2f}. 2 workers over 1, per round (the figure "
        f"is their median): {', '.join(f'{v:.2f}' for v in speed['speedup_2_over_1_per_round'])}; the ratio of "
        f"the medians: {speed['speedup_2_over_1_of_medians']:.2f}. The no-op teachers prepare their "
        "pixels on the CPU as a CPU teacher does (three float32 normalizations per image; with workers, in the "
        "workers, up to their byte budget: mcad_cache.embed.views_ahead). "
        "Teachers that hand the uint8 renders on unprepared (as a GPU teacher leaves the host CPU): 1 worker "
        f"{hand_off['median_samples_per_s']['1']:.1f}, 2 workers {hand_off['median_samples_per_s']['2']:.1f} "
        f"samples/s, {hand_off['speedup_2_over_1']:.2f}x (median of the rounds' ratios).",
        markdown_table(["workers", "samples", "seconds", "samples/s", "main CPU s", "workers' CPU s",
                        "cores busy (ours)", "load average before"], runs),
        "CPU seconds are this process's (the reader thread included) and its joined workers'; cores busy = "
        "their sum over the wall time. The load average counts every process on the machine.",
        "## Renders per sample",
        f"{renders['views']} views, two dual-stream teachers and the single-stream teacher at one size: "
        f"{renders['renders_per_sample']:g} renders per sample (a tower-by-tower loop: "
        f"{renders['tower_by_tower_renders_per_sample']}). With the single-stream teacher at another size "
        f"(e.g. BLIP-large's 384 px beside 224-px CLIPs): {results['details']['renders_other_size']['renders_per_sample']:g}.",
        "## bf16 teachers",
        f"Lowest cosine per stored array, amp-bf16 against fp32 ({results['details']['bf16']['teachers']}, "
        f"{results['details']['bf16']['rows']} rows): "
        + ", ".join(f"{k} {v:.6f}" for k, v in results["details"]["bf16"]["per_array"].items()) + ".",
        "## Block passes over tasks, integrate memory (bench/scale_blocks.py)",
        _blocks_text(results["details"]["block_passes"]),
        "## Stage-2 input (bench/scale_stream.py)",
        _stream_text(results["details"]["stage2_stream"]),
    ])


def _blocks_text(blocks: dict) -> str:
    wall = blocks["block_pass_wall_s"]
    return (f"Search, rescore, fuse and integrate of one store's blocks, median wall: 1 task {wall['1']:.2f} s, "
            f"2 tasks {wall['2']:.2f} s; the busiest task's "
            f"CPU time with 2 tasks over 1 task's: {blocks['block_pass_2_tasks_busiest_cpu_ratio']} (the wall ratio's "
            f"floor where each task has a free core). Integrate's peak RSS, 8 blocks over 2: "
            f"{blocks['integrate_rss_8_blocks_over_2_blocks']} (above the process's start: "
            f"{blocks['integrate_rss_8_over_2_above_start']}; the old in-memory integrate: "
            f"{blocks['integrate_in_memory_rss_8_blocks_over_2_blocks']}).")


def _stream_text(stream: dict) -> str:
    d = stream["details"]
    return (f"Peak RSS of the stage-2 data path, blocks of 2 shards {d['rss_block_2']['peak_rss_mb']:.0f} MB, of 8 "
            f"{d['rss_block_8']['peak_rss_mb']:.0f} MB. First batch of a block over a steady one: "
            f"{stream['stage2_batch_after_block_switch_ratio']} with the next block read ahead, "
            f"{d['timing_block_2_without_prefetch']['ratio']:.2f} without.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=320, help="generated JPEG side")
    parser.add_argument("--source-size", type=int, default=224, help="teacher input size the images are resized to")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--note", default="", help="a sentence on the machine's state, kept in the results")
    args = parser.parse_args()
    if args.quick:
        args.shards, args.per_shard, args.image_size, args.source_size, args.repeats = 4, 16, 64, 32, 1
    quiet_progress()
    import torch
    from transformers import AutoTokenizer

    from mcad_cache.config import CacheConfig
    from mcad_core.shards import list_shards

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("XDG_CACHE_HOME", str(root / "xdg"))  # shard fingerprints stay in the temp dir
        shards_dir, tokenizer_dir = make_world(root, args.shards, args.per_shard, args.image_size)
        shards = list_shards(shards_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        teachers = noop_teachers(tokenizer, str(tokenizer_dir), args.source_size)
        cfg = CacheConfig(shards=str(shards_dir), teachers_dir=None, source_size=args.source_size, views=1,
                          batch_size=256, k=1, device="cpu")
        speed = worker_speedup(shards, teachers, cfg, args.repeats)
        hand_off = worker_speedup(shards, noop_teachers(tokenizer, str(tokenizer_dir), args.source_size,
                                                        normalize=False), cfg, args.repeats, (1, 2))
        renders = renders_per_sample(shards[0], teachers, cfg, 30)
        other = renders_per_sample(shards[0], noop_teachers(tokenizer, str(tokenizer_dir), args.source_size,
                                                            single_size=args.source_size + 32), cfg, 30)
        bf16 = bf16_cosine(shards_dir, tokenizer_dir, root)
    from bench.choose_texts import main as choose_texts_timing

    choose = choose_texts_timing(["--repeats", "3"] if args.quick else [])  # B=1024, k=32, one thread
    from bench import scale_blocks, scale_stream

    blocks = scale_blocks.measure(args.quick)  # block passes over tasks, integrate memory
    stream = scale_stream.measure(args.quick)  # stage-2 block switch and memory
    results = {
        "stage1_noop_teacher_speedup_2_workers": rounded(speed["speedup_2_over_1"]),
        "stage1_renders_per_sample_30_views_2_teachers": renders["renders_per_sample"],
        "bf16_embedding_cosine_min": rounded(bf16["min_cosine"], 6),
        "stage2_choose_texts_ms_b1024_k32": choose["gather/scatter"],
        **{name: blocks[name] for name in ("block_pass_2_tasks_identical", "block_pass_2_tasks_wall_ratio",
                                           "integrate_rss_8_blocks_over_2_blocks")},
        **{name: stream[name] for name in ("stage2_batch_after_block_switch_ratio", "stage2_rss_block_8_over_block_2")},
        "setup": {"shards": args.shards, "per_shard": args.per_shard, "image_size": args.image_size,
                  "source_size": args.source_size, "repeats": args.repeats, "threads": args.threads,
                  "quick": args.quick, "note": args.note, **machine()},
        "details": {"workers": speed, "workers_no_cpu_normalization": hand_off, "renders": renders,
                    "renders_other_size": other, "bf16": bf16, "choose_texts_ms": choose,
                    "block_passes": blocks, "stage2_stream": stream},
    }
    publish(args.out, NAME, results, figures, markdown)
    print(markdown(results))


if __name__ == "__main__":
    main()
