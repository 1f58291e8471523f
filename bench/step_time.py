"""Stage-2 step time, side by side in one process: student-only, cached MCAD, online MCAD.

One step is what an iteration of `mcad distill`'s loop costs once its batch is in memory
(data loading is excluded: batches are prepared up front):

- ``student_only``: student forward, itc loss, backward, gradient clipping, AdamW + scheduler step;
- ``cached``: the target rebuild from cached arrays (``batch_targets``: teacher logits from the cached
  embeddings of exactly the batch's views and captions, fused list entries overwritten, integrated
  features gathered) + the ``mcad`` loss terms (itc + kd + fd + ia) + the same backward/optimizer step;
- ``online``: the teachers run on the batch instead (``OnlineTeachers.targets``: every dual teacher on the
  re-rendered views and captions, in-batch top-k, single-stream ITM of those pairs and the positives,
  fusion, integration module) + the same ``mcad`` step.

All three use the same student initialisation (each its own copy and optimizer) and the same batch.
Variants are interleaved round by round after warmup rounds; each figure is the median of the timed steps.

Settings: (a) ``toy``: the cache's own teachers and arrays, the batch size `mcad distill` uses;
(b) ``realistic``: random-init open_clip ``ViT-B-16`` dual teachers (224 px; as many as the cache has dual
teachers) and a random-init BLIP-base ITM (``BlipConfig()``, 384 px, captions of <= 35 tokens), with the
cached arrays replaced by random ones of the widths such a store would hold (512 per CLIP embedding,
768 integrated features; the student's feature heads project to 768). The online step at (b) is minutes
on a CPU, so (b) uses a small batch, two timed online steps, and warms the online path up on the batch's
first rows only.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import (add_common_args, apply_threads, check_inputs, Figure, Inputs, inputs_from, machine,
                          markdown_table, median, publish, pyplot, quiet_progress, rounded, save_figure, timed)

NAME = "step_time"
VARIANTS = ("student_only", "cached", "online")
REALISTIC_CAPTION_TOKENS = 35  # BLIP's retrieval models truncate captions at 35 tokens


@dataclass(frozen=True)
class Setting:
    """How one setting is timed."""

    name: str
    batch_size: int
    warmup: int
    timed: int
    online_timed: int
    online_warmup_rows: int | None = None  # None: warm the online path on the whole batch


def settings(quick: bool) -> list[Setting]:
    if quick:
        return [Setting("toy", 8, 1, 2, 2), Setting("realistic", 4, 1, 2, 1, online_warmup_rows=2)]
    from mcad_student.train import DistillConfig

    toy_batch = DistillConfig().batch_size  # what `mcad distill` trains with
    return [Setting("toy", toy_batch, 2, 6, 6), Setting("realistic", 8, 2, 8, 2, online_warmup_rows=2)]


# ---------------------------------------------------------------------- one training step


def train_step(student, optimizer, scheduler, batch: dict, cfg, teachers: tuple[str, ...]) -> None:
    """`mcad distill`'s own step (``batch_terms`` + ``optimizer_step``) for one in-memory batch, one process."""
    from mcad_student.train import batch_terms, optimizer_step

    terms = batch_terms(student, batch, cfg, teachers)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark step ({cfg.mode})")
    optimizer_step(student, optimizer, scheduler, loss)


def sub_batch(batch: dict, rows: int) -> dict:
    """The first ``rows`` samples of a batch (the fields the steps read)."""
    out = dict(batch)
    for key in ("pixels", "input_ids", "rows", "texts", "source_images", "boxes", "views"):
        out[key] = batch[key][:rows]
    out["captions"] = batch["captions"][:rows]
    return out


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    warm: Callable[[], None]
    timed: int


def run_interleaved(variants: list[Variant], warmup: int) -> dict[str, list[float]]:
    """``warmup`` untimed rounds, then timed rounds; each round runs every variant that still has steps to time."""
    for _ in range(warmup):
        for variant in variants:
            variant.warm()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_ in range(max(v.timed for v in variants)):
        for variant in variants:
            if round_ < variant.timed:
                times[variant.name].append(timed(variant.step))
    return times


# ---------------------------------------------------------------------- students, batches, teachers


def student_config(manifest: dict, quick: bool, feature_dim: int):
    """The student `mcad distill` builds (tiny with ``quick``), heads projecting to ``feature_dim``."""
    from mcad_student.model import StudentConfig
    from mcad_student.train import DistillConfig

    base = DistillConfig().student
    if quick:
        base = StudentConfig(image_model="mobilevitv2_050", image_size=32, text_layers=1, text_width=32,
                             text_heads=2, text_intermediate=64, embed_dim=16)
    return replace(base, feature_dims=(feature_dim, feature_dim),
                   context_length=int(manifest["tokenizer"]["context_length"]))


def first_batch(store: Path, batch_size: int, image_size: int):
    """(stream, block, batch): the first neighbour batch `mcad distill` (mode mcad, seed 0) would train on."""
    from mcad_student.data import CacheBatches, Position

    stream = CacheBatches(store, batch_size, image_size, seed=0, fused=True)
    _, batch = next(stream.iter_from(Position()))
    block = stream.block(int(batch["block"].lstrip("b")))
    return stream, block, batch


def realistic_block(block, widths: dict[str, int], feature_dim: int, seed: int = 0):
    """The block with its cached embeddings and integrated features replaced by random unit float16 vectors of
    the given widths (what a store made with those teachers would hold); lists and captions kept."""
    gen = torch.Generator().manual_seed(seed)
    n, t = len(block.keys), len(block.text_image)
    views = next(iter(block.image_emb.values())).shape[1]

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1).half()

    return replace(block, image_emb={name: unit(n, views, d) for name, d in widths.items()},
                   text_emb={name: unit(t, d) for name, d in widths.items()},
                   integrated_image=unit(n, feature_dim), integrated_text=unit(t, feature_dim))


def realistic_teachers(manifest: dict, quick: bool):
    """(dual teachers by name, single-stream teacher): random-init ViT-B-16 CLIPs and BLIP-base ITM
    (tiny stand-ins of the same classes with ``quick``)."""
    import open_clip
    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    from mcad_world.configs import blip_config, clip_model_cfg, clip_preprocess_cfg
    from mcad_cache.teachers.dual import DualStreamTeacher, DualTeacherSpec
    from mcad_cache.teachers.blip import BlipItmTeacher
    from mcad_cache.teachers.single import SingleTeacherSpec
    from mcad_world.config import TowerShape

    tokenizer_path = manifest["tokenizer"]["path"]
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    context = int(manifest["tokenizer"]["context_length"])
    tiny = TowerShape(width=32, layers=1, heads=2, embed_dim=16, patch_size=8)
    duals = {}
    for i, _ in enumerate(manifest["dual_teachers"]):
        torch.manual_seed(i)
        if quick:
            model = open_clip.model.CLIP(**clip_model_cfg(tiny, 32, len(tok), context, tok.sep_token_id))
            open_clip.model.set_model_preprocess_cfg(model, clip_preprocess_cfg(32))
            tokenizer = open_clip.tokenizer.HFTokenizer(tokenizer_path, context_length=context)
            duals[f"tiny_clip_{i}"] = DualStreamTeacher(model, None, tokenizer, DualTeacherSpec("tiny"))
        else:
            model = open_clip.create_model("ViT-B-16")  # random init: nothing is downloaded
            duals[f"ViT-B-16_{i}"] = DualStreamTeacher(model, None, open_clip.get_tokenizer("ViT-B-16"),
                                                       DualTeacherSpec("ViT-B-16"))
    torch.manual_seed(len(duals))
    if quick:
        tokens = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id}
        config, size, caption_tokens = blip_config(tiny, 32, len(tok), context, tokens), 32, context
    else:
        # BlipVisionConfig's default initializer_range (1e-10) gives ~zero weights; trained weights are ~0.02.
        config, size, caption_tokens = BlipConfig(vision_config={"initializer_range": 0.02}), 384, \
            REALISTIC_CAPTION_TOKENS
    model = BlipForImageTextRetrieval(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                              tokenizer=tok)
    single = BlipItmTeacher(model, processor, SingleTeacherSpec("random-init BLIP"))
    single.context_length = caption_tokens
    return duals, single


def online_from_parts(duals: dict, single, manifest: dict, integration_dim: int):
    """``OnlineTeachers`` around given teachers (not the store's), with a random-init integration module of the
    shapes they imply; the store's dual weights, k and fusion rule. ``targets`` is online.py's own code."""
    from mcad_cache.integrate import IntegrationModule
    from mcad_student.online import OnlineTeachers

    dual_dim = sum(t.embed_dim for t in duals.values())
    integration = IntegrationModule(dual_dim, single.fused_dim, integration_dim)
    return OnlineTeachers(duals, single, manifest["search"]["dual_weights"], manifest["search"]["k"],
                          manifest["fusion"]["rule"], manifest["fusion"]["a"], integration)


# ---------------------------------------------------------------------- one setting


def measure_setting(setting: Setting, inputs: Inputs, work: Path) -> dict:
    from mcad_student.data import TargetSpec, batch_targets
    from mcad_student.model import build_student
    from mcad_student.train import DistillConfig, _optimizer
    from mcad_cache.store import CacheStore

    manifest = CacheStore.open(inputs.store).manifest
    realistic = setting.name == "realistic"
    if realistic:
        duals, single = realistic_teachers(manifest, inputs.quick)
        widths = {name: t.embed_dim for name, t in duals.items()}
        feature_dim = single.fused_dim
        teacher_note = (", ".join(f"{n} (width {d}, {duals[n].image_size}px)" for n, d in widths.items())
                        + f"; single {single.spec.name} (fused {single.fused_dim}, {single.image_size}px)")
    else:
        feature_dim = int(manifest["integration"]["dim"])
        teacher_note = ", ".join(f"{n} (width {manifest['teachers'][n]['embed_dim']})"
                                 for n in manifest["dual_teachers"] + [manifest["single_teacher"]])
    scfg = student_config(manifest, inputs.quick, feature_dim)
    stream, block, batch = first_batch(inputs.store, setting.batch_size, scfg.image_size)
    if realistic:
        block = realistic_block(block, widths, feature_dim)
        online = online_from_parts(duals, single, manifest, feature_dim)
        spec = TargetSpec(tuple(widths), tuple(online.weights), tuple(online.scales), fused=True)
    else:
        from mcad_student.online import OnlineTeachers

        online = OnlineTeachers.from_store(stream.store)
        spec = stream.spec
    torch.manual_seed(0)
    base = build_student(scfg, manifest["tokenizer"]["path"], work / f"student_{setting.name}")
    base.train()
    cfgs = {"student_only": DistillConfig(mode="contrastive", student=scfg),
            "cached": DistillConfig(mode="mcad", student=scfg), "online": DistillConfig(mode="mcad", student=scfg)}
    students = {name: copy.deepcopy(base) for name in VARIANTS}
    optims = {name: _optimizer(students[name], cfgs[name]) for name in VARIANTS}
    teachers = spec.teachers

    def step(name: str, b: dict) -> None:
        train_step(students[name], *optims[name], b, cfgs[name], teachers)

    def student_only(b: dict = batch) -> None:
        step("student_only", b)

    def cached(b: dict = batch) -> None:
        targets = batch_targets(block, b["rows"], b["texts"], b["views"], spec)
        step("cached", {**b, "targets": targets, "integrated_image": block.integrated_image[b["rows"]].float(),
                        "integrated_text": block.integrated_text[b["texts"]].float()})

    def online_step(b: dict = batch) -> None:
        out = online.targets(b["source_images"], b["boxes"], b["captions"])
        step("online", {**b, "targets": {"ensemble": out["ensemble"]}, "integrated_image": out["integrated_image"],
                        "integrated_text": out["integrated_text"]})

    warm_batch = sub_batch(batch, setting.online_warmup_rows) if setting.online_warmup_rows else batch
    variants = [Variant("student_only", student_only, student_only, setting.timed),
                Variant("cached", cached, cached, setting.timed),
                Variant("online", online_step, lambda: online_step(warm_batch), setting.online_timed)]
    times = run_interleaved(variants, setting.warmup)
    n = len(batch["rows"])
    result = {
        "batch_size": n, "k": int(manifest["search"]["k"]), "online_k": min(int(manifest["search"]["k"]), n),
        "warmup_rounds": setting.warmup, "online_warmup_rows": setting.online_warmup_rows or n,
        "teachers": teacher_note, "student_feature_dim": feature_dim, "student_image_size": scfg.image_size,
        "student_parameters": sum(p.numel() for p in base.parameters()),
        "variants": {name: {"median_s": rounded(median(ts)), "times_s": [rounded(t) for t in ts],
                            "samples_per_s": rounded(n / median(ts))} for name, ts in times.items()},
    }
    med = {name: median(ts) for name, ts in times.items()}
    result["cached_speed_vs_student"] = rounded(med["student_only"] / med["cached"])
    result["online_time_over_cached"] = rounded(med["online"] / med["cached"])
    return result


# ---------------------------------------------------------------------- the part


def figures(results: dict) -> list[Figure]:
    out = []
    for name, res in results["settings"].items():
        ratio = res["cached_speed_vs_student"]
        out.append(Figure(NAME, f"cached / student-only speed ({name}, batch {res['batch_size']})", ratio, "x",
                          ">= 0.9", None if ratio is None else ratio >= 0.9))
        online = res["online_time_over_cached"]
        target = ">= 5" if name == "realistic" else ""
        out.append(Figure(NAME, f"cached speed / online speed ({name}, batch {res['batch_size']})", online, "x",
                          target, (online >= 5) if target and online is not None else None))
    return out


def markdown(results: dict) -> str:
    rows = []
    for name, res in results["settings"].items():
        for variant, v in res["variants"].items():
            rows.append([name, res["batch_size"], variant, v["median_s"], v["samples_per_s"], len(v["times_s"])])
    lines = ["# Stage-2 step time (one process, interleaved; median of timed steps)", "",
             markdown_table(["setting", "batch", "variant", "median s/step", "samples/s", "timed steps"], rows), ""]
    for name, res in results["settings"].items():
        lines.append(f"- {name}: teachers {res['teachers']}; online in-batch k = {res['online_k']} "
                     f"(cache k = {res['k']}); student heads -> {res['student_feature_dim']}")
    lines += ["", markdown_table(["figure", "value", "target", "met"],
                                 [[f.name, f.value, f.target or "-", f.met] for f in figures(results)])]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    order = ("toy", "realistic")  # the JSON file stores keys sorted
    settings_ = sorted(results["settings"].items(), key=lambda item: order.index(item[0]) if item[0] in order else 9)
    fig, axes = plt.subplots(1, len(settings_), figsize=(5 * len(settings_), 4))
    for ax, (name, res) in zip(list(axes) if len(settings_) > 1 else [axes], settings_, strict=True):
        values = [res["variants"][v]["median_s"] for v in VARIANTS]
        bars = ax.bar(VARIANTS, values, color=["#888888", "#2b7bba", "#d95f02"])
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 10, max(values) * 3)  # log bars need a floor well below the shortest
        ax.set_ylabel("seconds per step (median, log scale)")
        ax.set_title(f"{name} (batch {res['batch_size']})")
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.3g}s", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    fig.suptitle("Stage-2 step time: student-only vs cached MCAD vs online MCAD")
    save_figure(fig, path)


def run(inputs: Inputs, only: tuple[str, ...] = ("toy", "realistic")) -> dict:
    check_inputs(inputs)
    apply_threads(inputs.threads)
    results: dict = {"part": NAME, "quick": inputs.quick, "machine": machine(), "settings": {}}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as work:
        for setting in settings(inputs.quick):
            if setting.name in only:
                results["settings"][setting.name] = measure_setting(setting, inputs, Path(work))
    return publish(inputs.out, NAME, results, figures, markdown, plot)


def main(argv: list[str] | None = None) -> None:
    quiet_progress()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--settings", default="toy,realistic", help="which settings to time")
    args = parser.parse_args(argv)
    print(markdown(run(inputs_from(args), tuple(args.settings.split(",")))))


if __name__ == "__main__":
    main()
