"""The ``mcad`` command: thin click commands that fill a config dataclass and call the library."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from mcad_world.config import BLIP_VISION_INITS, TEACHERS, TeachersConfig
from mcad_cache.config import DUAL_WEIGHTINGS, TEACHER_PRECISIONS, CacheConfig
from mcad_core.config import EvalConfig
from mcad_core.errors import InputError
from mcad_core.paths import relative_to_cwd
from mcad_core.runlog import MCAD_LOGGERS
from mcad_student.choices import AMMKD_WEIGHTINGS, BATCHINGS, KD_DIRECTIONS, KD_KINDS, PRECISIONS

# Where `mcad distill`'s defaults live; mcad_student.train imports torch, so it is read only when a help
# page is shown (ConfigOption), never when the CLI loads.
DISTILL_CONFIG = "mcad_student.train:DistillConfig"
# mcad's own loggers (MCAD_LOGGERS, shared with the run log files of mcad_core.runlog): INFO with `mcad -v`;
# everything else (torch, transformers, ...) stays at WARNING.


class NoDataError(InputError):
    """`mcad teachers`' data directory is missing (exit 3)."""


def _attribute(spec: str):
    """``module:attribute`` imported now (the registries and configs behind the options import torch)."""
    import importlib

    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)



class Registered(click.ParamType):
    """A name from one of the library's registries (fusion rules, modes, presets), refused at parse time.

    The registry is imported when the option is parsed, or its command's help shown (the metavar lists
    the registered names, extensions included), not when the CLI loads, so `mcad --help` and
    `mcad search` import no torch.
    """

    name = "name"

    def __init__(self, registry: str, what: str):
        self.registry, self.what = registry, what

    def known(self) -> list[str]:
        return sorted(_attribute(self.registry))

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{'|'.join(self.known())}]"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(name) for name in self.known() if name.startswith(incomplete)]

    def convert(self, value, param, ctx):
        known = self.known()
        if value in known:
            return value
        self.fail(f"unknown {self.what} {value!r}; known: {', '.join(known)}", param, ctx)


FUSION = Registered("mcad_cache.fusion:FUSION_RULES", "fusion rule")


class ConfigOption(click.Option):
    """An option that stays None unless given (so a --config file can set the field), whose help shows the
    config dataclass's default: ``config`` ("module:Class") and ``field`` (dotted, e.g. "loss.alpha"; default:
    the option's name); ``shown`` turns the default into its help text. The class is imported when the help
    is shown, so the CLI loads without torch.
    """

    def __init__(self, *args, config: str, field: str | None = None, shown=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config, self.field, self.shown = config, field or self.name, shown

    def config_default(self):
        value = _attribute(self.config)()
        for part in self.field.split("."):
            value = getattr(value, part)
        return value

    def get_help_record(self, ctx):
        value = self.config_default()
        if value is None:
            return super().get_help_record(ctx)
        if self.shown is not None:
            shown = self.shown(value)
        elif self.is_bool_flag and self.secondary_opts:
            shown = (self.opts if value else self.secondary_opts)[0].lstrip("-")
        elif isinstance(value, tuple | list):
            shown = ", ".join(map(str, value))
        else:
            shown = str(value)
        text = self.help
        self.help = f"{text}  {_default(shown)}" if text else _default(shown)
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = text


def _preset_name(student) -> str:
    """The STUDENT_PRESETS name of a student config (how --student's help shows the default)."""
    presets = _attribute("mcad_student.model:STUDENT_PRESETS")
    return next((name for name, preset in presets.items() if preset == student), "a custom student")


def distill_option(*decls, **kwargs):
    """A `mcad distill` option whose help shows DistillConfig's default (None unless given)."""
    return click.option(*decls, cls=ConfigOption, config=DISTILL_CONFIG, **kwargs)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (click's test runner swaps it per call)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def configure_logging(verbose: bool) -> None:
    """Log to stderr: warnings from everyone; with ``verbose`` also INFO from mcad's own loggers
    (MCAD_LOGGERS), while third-party loggers stay at WARNING. Calling it again replaces its handler."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in MCAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.NOTSET)


class McadGroup(click.Group):
    """Maps the library's error families to the README's exit codes (``mcad_core.errors``).

    ``InputError`` (bad or missing input, a held lock, a full disk): its message, exit 3.
    Any ``OSError`` that is a full disk: "no space left on <path>", exit 3, not a traceback.
    """

    def invoke(self, ctx):
        from mcad_core.errors import InputError, is_no_space, no_space_path

        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except OSError as err:
            if not is_no_space(err):
                raise
            click.echo(f"error: no space left on {no_space_path(err) or 'the output disk'}", err=True)
            sys.exit(3)


@click.group(cls=McadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Log mcad's own progress at INFO level (other libraries' logs stay at WARNING).")
@click.version_option(package_name="mcad", prog_name="mcad", message="%(prog)s %(version)s")
def main(verbose: bool) -> None:
    """MCAD: run image-text teachers once into a cache, then distill small students from it.

    Typical order on the embedded default world: data -> eval -> cache -> distill (its teachers ship in
    teachers/default; `teachers` retrains them). Your own data: eval -> cache -> distill with hub teachers.
    """
    configure_logging(verbose)


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("data/default"), show_default=True,
              help="Directory that receives train/, val/, test/ shards and world.json.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-train", type=int, default=20000, show_default=True)
@click.option("--n-val", type=int, default=1000, show_default=True)
@click.option("--n-test", type=int, default=1000, show_default=True)
@click.option("--image-size", type=int, help="Image side in pixels (default world only)  [default: 64]")
@click.option("--captions-per-image", type=int, help="Captions per image (default world only)  [default: 3]")
@click.option("--samples-per-shard", type=int, default=1000, show_default=True)
@click.option("--world", type=click.Choice(["default", "quadrants"]), default="default", show_default=True,
              help="default: two related objects, 64px JPEG, 3 captions, NNNNN.tar shards, world.json. "
                   "quadrants: 1-3 objects in quadrants, other colours, shapes and grammar, 96px PNG, 5 captions, "
                   "part-NNNN.tar shards, no world.json (mcad_world/quadrants.py).")
def data(out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int, image_size: int | None,
         captions_per_image: int | None, samples_per_shard: int, world: str) -> None:
    """Generate a synthetic image-text world (the embedded default one, or the quadrant world).

    Writes webdataset shards in img2dataset's layout ({key}.jpg or .png, {key}.txt,
    {key}.json with a "captions" list) to OUT/{train,val,test}/. Deterministic from
    --seed; another seed is a disjoint stream of the same world (e.g. the teachers'
    own data). Default world: captions need attribute binding, every scene may have
    a twin with swapped colours or shapes and the same bag of words.
    """
    if world == "quadrants":
        from mcad_world.quadrants import write_other_world

        if image_size is not None or captions_per_image is not None:
            raise click.UsageError("--image-size and --captions-per-image apply to --world default only "
                                   "(the quadrant world is 96px with 5 captions)")
        start = time.perf_counter()
        try:
            written = write_other_world(out_dir, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                                        per_shard=samples_per_shard, progress=True)
        except ValueError as err:
            raise click.BadParameter(str(err)) from err
        counts = {"train": n_train, "val": n_val, "test": n_test}
        click.echo(f"wrote {out_dir} in {time.perf_counter() - start:.1f}s ({sum(map(len, written.values()))} "
                   f"shards): {json.dumps(counts)} samples")
        return
    from mcad_world.synth import WorldConfig, generate

    image_size = 64 if image_size is None else image_size
    captions_per_image = 3 if captions_per_image is None else captions_per_image
    try:
        cfg = WorldConfig(seed=seed, image_size=image_size, n_train=n_train, n_val=n_val, n_test=n_test,
                          samples_per_shard=samples_per_shard, captions_per_image=captions_per_image)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    start = time.perf_counter()
    world = generate(out_dir, cfg)
    counts = {split: info["samples"] for split, info in world["splits"].items()}
    click.echo(f"wrote {out_dir} in {time.perf_counter() - start:.1f}s: {json.dumps(counts)} samples")


def _default(value) -> str:
    """The ``[default: ...]`` note for an option that is None unless given, so that a --config file can set it."""
    return f"[default: {value}]"


def _float_list(ctx, param, value: str | None) -> tuple[float, ...] | None:
    """A comma-separated list of numbers ("1,3" -> (1.0, 3.0)), or None when the option is not given."""
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.3,0.7, got {value!r}") from None


def _flag_default(name: str, value: bool) -> str:
    return _default(name if value else f"no-{name}")


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A JSON or TOML file of TeachersConfig fields (tables for clip_a, clip_b, clip_schedule and blip, "
                   "the BLIP recipe, with blip.shape and blip.schedule); options given on the command line "
                   "override it.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="World made by `mcad data` (reads train/); a missing directory is refused (exit 3).  "
                   f"{_default(TeachersConfig.data_dir)}")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help=f"Receives tokenizer/, clip_a/, clip_b/, blip/ and teachers.json.  "
                   f"{_default(TeachersConfig.out_dir)}")
@click.option("--clip-steps", type=int, help=_default(TeachersConfig.clip_schedule.steps))
@click.option("--blip-steps", type=int, help=_default(TeachersConfig.blip.schedule.steps))
@click.option("--blip-batch-size", type=int,
              help="Images per BLIP step; each brings its positive pair, its mined and edited negatives and "
                   "(with --blip-mask-prob) a masked caption to the fused pass.  "
                   f"{_default(TeachersConfig.blip.schedule.batch_size)}")
@click.option("--clip-b-width", type=int,
              help="Width (and embedding size) of the second CLIP, the one AMMKD adds; a multiple of its "
                   f"{TeachersConfig.clip_b.heads} heads.  {_default(TeachersConfig.clip_b.width)}")
@click.option("--seed", type=int, help=_default(TeachersConfig.seed))
@click.option("--image-size", type=int,
              help="Train the teachers at this square image size [default: the most common size in the data].")
@click.option("--blip-mask-prob", type=float,
              help="Share of caption words BLIP's image-conditioned MLM term masks (0: no MLM term).  "
                   f"{_default(TeachersConfig.blip.mask_prob)}")
@click.option("--blip-mined-negatives", type=int,
              help="ITM negatives per image and per text sampled from the ITC similarities (ALBEF's hard "
                   f"negatives).  {_default(TeachersConfig.blip.mined_negatives)}")
@click.option("--blip-uniform-share", type=float,
              help="Share of a uniform draw mixed into the mined negatives' distribution (0: ALBEF's, all "
                   f"mined).  {_default(TeachersConfig.blip.uniform_share)}")
@click.option("--blip-random-negatives", type=int,
              help="Uniform ITM negatives per image and per text, besides the one mined from ITC.  "
                   f"{_default(TeachersConfig.blip.random_negatives)}")
@click.option("--blip-edit-negatives/--no-blip-edit-negatives", default=None,
              help="One rule-made ITM negative caption per image: a word replaced or swapped, or the relation "
                   "flipped, from the word groups the data's world.json names (caption_edits, written by `mcad "
                   "data`). Data that names none trains without them; the reason is logged and kept in "
                   "teachers.json.  "
                   f"{_flag_default('blip-edit-negatives', TeachersConfig.blip.edit_negatives)}")
@click.option("--blip-listwise/--no-blip-listwise", default=None,
              help="Add a listwise ITM term: softmax over each query's true pair and its negatives.  "
                   f"{_flag_default('blip-listwise', TeachersConfig.blip.listwise)}")
@click.option("--blip-vision-init", type=click.Choice(BLIP_VISION_INITS),
              help="Start BLIP's image tower from this trained CLIP's ('': from scratch).  "
                   f"{_default(TeachersConfig.blip.vision_init)}")
@click.option("--blip-freeze-vision/--no-blip-freeze-vision", default=None,
              help="Lock the image tower taken from --blip-vision-init (LiT): its tokens are computed once, "
                   "and only the text and cross-attention side trains.  "
                   f"{_flag_default('blip-freeze-vision', TeachersConfig.blip.freeze_vision)}")
@click.option("--clip-ln-pre/--no-clip-ln-pre", default=None,
              help="Give the CLIPs open_clip's pre-block LayerNorm. BLIP's ViT has none, so with it "
                   "--blip-freeze-vision cannot lock an exact copy of a CLIP tower.  "
                   f"{_flag_default('clip-ln-pre', TeachersConfig.clip_ln_pre)}")
@click.option("--clip-workers", type=int,
              help="Threads that each encode a slice of every CLIP training batch with one intra-op thread; 1: one "
                   "graph per step on all threads. On a 2-core CPU two workers train the CLIPs faster, since one "
                   "operator of these small models splits badly over threads.  "
                   f"{_default(TeachersConfig.clip_workers)}")
@click.option("--blip-split-negatives", type=int,
              help="Text-to-image ITM negatives per text drawn from its ITC top 16 over the whole training split, "
                   "the candidates re-ranking meets (needs --blip-freeze-vision).  "
                   f"{_default(TeachersConfig.blip.split_negatives)}")
@click.option("--blip-lr", type=float,
              help="BLIP's peak learning rate (AdamW, warmup then cosine).  "
                   f"{_default(TeachersConfig.blip.schedule.lr)}")
@click.option("--only", type=click.Choice(TEACHERS), multiple=True,
              help="Retrain only this teacher (repeatable); the others and the tokenizer in --out are kept.")
@click.option("--on-error", type=click.Choice(["raise", "warn"]),
              help="Bad samples or shards: stop naming shard and key (raise), or skip and count them (warn).  "
                   f"{_default(TeachersConfig.on_error)}")
def teachers(config_file: Path | None, **options) -> None:
    """Train the default world's teachers on CPU: two CLIPs (open_clip) and a BLIP ITM (transformers).

    Each is saved in its hub layout (open_clip local-dir, Hugging Face
    save_pretrained) and is loaded back by exactly the code that loads hub
    teachers. Real runs skip this and name hub teachers instead.
    """
    from mcad_world import train as teacher_train

    try:
        cfg = teachers_config(config_file, options)
    except (ValueError, TypeError) as err:  # TypeError: a config table that lacks a required field
        raise click.UsageError(str(err)) from err
    if not Path(cfg.data_dir).is_dir():
        what = "is not a directory" if Path(cfg.data_dir).exists() else "does not exist"
        raise NoDataError(f"data directory {cfg.data_dir} (--data, or data_dir in --config) {what}: "
                          "run `mcad data` first, or name a directory holding train/ shards")
    try:
        report = teacher_train.train_teachers(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from err
    if report["skipped"]:
        click.echo(f"skipped bad training samples: {report['skipped']}", err=True)
    for name in TEACHERS:
        entry = report[name]
        click.echo(f"{name}: {entry['steps']} steps, loss {entry['first_loss']:.3f} -> {entry['last_loss']:.3f}, "
                   f"{entry['seconds']:.0f}s -> {entry['spec']}")


def teachers_config(config_file: Path | None, options: dict) -> TeachersConfig:
    """`mcad teachers`' config: ``config_file`` (or the defaults) with the options given on the command line.

    ``options`` are the command's, None (or () for --only) where not given. ``--blip-X``
    sets ``blip.X`` (``--blip-steps``, ``--blip-batch-size`` and ``--blip-lr`` set
    ``blip.schedule``), all in one step, so the recipe is checked as a whole.
    """
    from mcad_core.config import load_config_file

    cfg = load_config_file(config_file, TeachersConfig) if config_file else TeachersConfig()
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    schedule = {k: given.pop(f"blip_{k}") for k in ("steps", "batch_size", "lr") if f"blip_{k}" in given}
    recipe = {k.removeprefix("blip_"): given.pop(k) for k in list(given) if k.startswith("blip_")}
    if schedule:
        recipe["schedule"] = replace(cfg.blip.schedule, **schedule)
    if recipe:
        given["blip"] = replace(cfg.blip, **recipe)
    if "clip_steps" in given:
        given["clip_schedule"] = replace(cfg.clip_schedule, steps=given.pop("clip_steps"))
    if "clip_b_width" in given:
        width = given.pop("clip_b_width")
        given["clip_b"] = replace(cfg.clip_b, width=width, embed_dim=width)
    return replace(cfg, **given)


@main.command("eval")
@click.option("--shards", default=EvalConfig.shards, show_default=True,
              help="Shard directory, tar file or brace pattern to evaluate on.")
@click.option("--teachers", "teachers_dir", type=click.Path(path_type=Path), default=None,
              help="Directory written by `mcad teachers`: evaluates all of its teachers.")
@click.option("--dual", "duals", multiple=True,
              help="A dual-stream model as open_clip names it: 'ViT-B-16:openai', 'hf-hub:org/repo' or "
                   "'local-dir:PATH'. Repeatable.")
@click.option("--single", "singles", multiple=True,
              help="A single-stream model: a BLIP ITM hub id or local directory, or KIND:NAME of a registered "
                   "kind (mcad_cache/teachers/single.py). Repeatable.")
@click.option("--rerank-k", type=int, default=EvalConfig.rerank_k, show_default=True,
              help="ITC candidates per query that the single-stream ITM head re-ranks.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), default=None,
              help="Write the results as JSON here.")
@click.option("--on-error", type=click.Choice(["raise", "warn"]), default="raise", show_default=True,
              help="Bad samples or shards: stop naming shard and key (raise), or skip and count them (warn).")
def eval_cmd(shards: str, teachers_dir: Path | None, duals: tuple[str, ...], singles: tuple[str, ...],
             rerank_k: int, out_json: Path | None, on_error: str) -> None:
    """Recall@1/5/10 (image-to-text, text-to-image) and mean recall on a shard set.

    Scores dual-stream models by embedding similarity, and single-stream models
    three ways: by their ITC embeddings; re-ranking the ITC top-k by the ITM
    logit alone (ALBEF's evaluation); and by ITM logit + ITC logit (cosine over
    the teacher's ITC temperature; BLIP's evaluation adds ITM and ITC). An
    image query is a hit if any of its captions is in the top k.
    """
    from pipeline.jobs import evaluate_models, format_table
    from mcad_core.shards import ShardReadError

    cfg = EvalConfig(shards=shards, rerank_k=rerank_k, out_json=out_json, on_error=on_error)
    try:
        results, skipped = evaluate_models(cfg, teachers_dir, list(duals), list(singles))
    except (FileNotFoundError, ValueError, ShardReadError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(format_table(results))
    if skipped:
        click.echo(f"skipped bad samples: {skipped}", err=True)


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A JSON or TOML file of CacheConfig fields; options given on the command line override it.")
@click.option("--shards", help="Source shards: a directory of NNNNN.tar, a file, or a brace pattern.  "
                               f"{_default(CacheConfig.shards)}")
@click.option("--store", type=click.Path(path_type=Path),
              help=f"The Zarr store to create or complete.  {_default(CacheConfig.store)}")
@click.option("--teachers", "teachers_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Directory written by `mcad teachers` (clip_a, clip_b, blip, tokenizer); --dual and --single "
                   f"name teachers instead.  {_default(CacheConfig.teachers_dir)}")
@click.option("--dual", "duals", multiple=True,
              help="Explicit dual-stream teacher: 'ViT-B-16:openai', 'local-dir:PATH' or 'hf-hub:ORG/REPO'. "
                   "Repeatable.")
@click.option("--single", help="Explicit single-stream teacher: a BLIP ITM hub id or directory, or KIND:NAME "
                                "of a registered kind (mcad_cache/teachers/single.py).")
@click.option("--tokenizer", help="The student's tokenizer (hub id or directory) for the stored caption tokens "
                                   "[default: the teachers directory's tokenizer/].")
@click.option("--views", type=int,
              help=f"Augmented views per image (view 0 is the whole image).  {_default(CacheConfig.views)}")
@click.option("--single-itc-views", type=click.Choice(["first", "all"]),
              help="Views of the single-stream teacher's ITC image embeddings to store (nothing downstream reads "
                   "more than the first, and each extra view costs a vision pass of that teacher).  "
                   f"{_default(CacheConfig.single_itc_views)}")
@click.option("-k", "--k", "k", type=int,
              help=f"Candidates per anchor in the fused top-k lists.  {_default(CacheConfig.k)}")
@click.option("--block-shards", type=int,
              help="Shards per candidate-search block (stage 2 draws each batch from one block).  "
                   f"{_default(CacheConfig.block_shards)}")
@click.option("--fusion", "fusion_rule", type=FUSION,
              help=f"Fusion rule (mcad_cache/fusion.py FUSION_RULES).  {_default(CacheConfig.fusion_rule)}")
@click.option("--fusion-a", type=float, help=f"The fusion rule's weight a.  {_default(CacheConfig.fusion_a)}")
@click.option("--dual-weights", callback=_float_list,
              help="Comma-separated weights of the dual-stream teachers in the kd target, the candidate search and "
                   "the integrated features, in teacher order (normalized to sum 1); `mcad cache-info --weights` "
                   "on a store counts which ranks the data best.  [default: --dual-weighting]")
@click.option("--dual-weighting", type=click.Choice(DUAL_WEIGHTINGS),
              help="Without --dual-weights: 'equal', or 'ranked': the weighting (in tenths) whose weighted logits "
                   "rank the first block's own pairs best (`mcad cache-info --weights`'s count), chosen once "
                   f"before the candidates are searched.  {_default(CacheConfig.dual_weighting)}")
@click.option("--passes", default=",".join(("embed", "search", "rescore", "fuse", "integrate")), show_default=True,
              help="Comma-separated passes to run; done work is skipped.")
@click.option("--rank", type=int, help="This task's rank (default: from torchrun or Slurm environment variables).")
@click.option("--world-size", type=int, help="Number of tasks (with --rank).")
@click.option("--on-error", type=click.Choice(["warn", "raise"]),
              help="Bad samples: warn skips, counts and records them in the store; raise stops.  "
                   f"{_default(CacheConfig.on_error)}")
@click.option("--max-image-pixels", type=int,
              help="Images with more pixels are bad samples (see --on-error), refused from their header without "
                   f"being decoded.  {_default(f'{CacheConfig.max_image_pixels:,}')}")
@click.option("--threads", type=int, help=f"torch CPU threads (0: torch's default).  {_default(CacheConfig.threads)}")
@click.option("--device", help="Teacher device: auto (cuda:$LOCAL_RANK if available, else cpu), cpu, cuda:0, ...  "
                               f"{_default(CacheConfig.device)}")
@click.option("--precision", type=click.Choice(TEACHER_PRECISIONS),
              help="The teachers' forwards in float32, or under autocast to bfloat16 or float16 (amp-fp16: CUDA "
                   "only); embeddings are stored as float16 either way, and a store keeps the precision it was "
                   f"begun with.  {_default(CacheConfig.precision)}")
@click.option("--workers", type=int,
              help="Processes that decode and tokenize shards ahead while the teachers run (0: one reader "
                   f"thread); the store is the same.  {_default(CacheConfig.workers)}")
@click.option("--summary-json", type=click.Path(path_type=Path), default=None,
              help="Also write this run's summary here: seconds per pass, time inside teacher forwards, the "
                   "overhead ratios, the config and which of its settings are not the defaults (what `make "
                   "cache` keeps in bench/results/cache_run.json for `make bench`).")
def cache(config_file: Path | None, passes: str, rank: int | None, world_size: int | None,
          summary_json: Path | None, **options) -> None:
    """Stage 1: run the teachers once over the shards and write the Zarr cache store.

    Passes: embed (per shard; split over torchrun/Slurm tasks) -> search -> rescore
    -> fuse -> integrate (per block, split by block over tasks, after every shard is embedded;
    the task that fuses the last block runs integrate).
    Re-running skips done shards and passes, so a killed job is simply run again.
    A store made with other teachers, shards, k or schema is refused with the differences.
    """
    from mcad_cache.store import CacheIncompleteError, CacheMismatchError
    from mcad_cache.job import run_cache, store_log_path
    from mcad_cache.config import CacheConfig
    from mcad_core.config import load_config_file
    from mcad_core.dist import PlacementError, explicit_place, task_place

    try:
        cfg = load_config_file(config_file, CacheConfig) if config_file else CacheConfig()
        overrides = {k: v for k, v in options.items() if v is not None and v != ()}
        if overrides.get("duals"):
            overrides["dual"] = tuple(overrides.pop("duals"))
        overrides.pop("duals", None)
        if "dual" in overrides or "single" in overrides:
            overrides.setdefault("teachers_dir", None)
        cfg = replace(cfg, **overrides)
        if (rank is None) != (world_size is None):
            raise click.UsageError("--rank and --world-size go together")
        place = explicit_place(rank, world_size) if rank is not None else task_place()
    except (ValueError, PlacementError) as err:
        raise click.UsageError(str(err)) from err
    try:
        summary = run_cache(cfg, [p.strip() for p in passes.split(",") if p.strip()], place)
    except (CacheMismatchError, CacheIncompleteError, FileNotFoundError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo("\n".join(summary.lines()))
    click.echo(f"  log: {store_log_path(cfg.store, place.rank)}")
    if summary_json is not None:
        from mcad_core.atomic import atomic_write_json

        location = {"shards", "store", "teachers_dir", "threads", "device"}  # where, not what: no recipe
        defaults = CacheConfig()
        changed = sorted(f for f in cfg.to_dict() if f not in location
                         and cfg.to_dict()[f] != defaults.to_dict()[f])
        atomic_write_json(summary_json, {"summary": summary.to_dict(), "config": cfg.to_dict(),
                                         "passes": [p.strip() for p in passes.split(",") if p.strip()],
                                         "non_default_settings": changed})


@main.command("cache-info")
@click.argument("store", type=click.Path(path_type=Path))  # a missing store is named by describe (exit 3)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--lists", is_flag=True,
              help="Also read every block's top-k lists and report, per direction, how often the dual, ITM and "
                   "fused scores rank a true pair first among an anchor's candidates (an ITM share no higher "
                   "than the dual one: the fused targets add no ranking signal on this data).")
@click.option("--weights", "weight_steps", type=click.IntRange(min=1), is_flag=False, flag_value=10, default=None,
              help="Also count, for every weighting of the dual-stream teachers on a grid of 1/N steps (N: this "
                   "option's value, 10 when given alone), how often their weighted logits rank a true pair first "
                   "over each block, and name the best weighting (pass it to `mcad cache --dual-weights` for a "
                   "new store). Reads every embedded block's embeddings.")
def cache_info(store: Path, as_json: bool, lists: bool, weight_steps: int | None) -> None:
    """Describe a cache store: manifest, array sizes, bytes per sample per view, and what is missing."""
    from mcad_cache.info import describe, format_report

    report = describe(store, lists=lists, weight_steps=weight_steps or 0)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else format_report(report))


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A JSON or TOML file of DistillConfig fields (nested tables for student and loss); "
                   "command-line options override it.")
@distill_option("--store", type=click.Path(path_type=Path), help="The cache store written by `mcad cache`.")
@distill_option("--out", "out_dir", type=click.Path(path_type=Path),
                help="Run directory: checkpoint.pt, metrics.csv, log.txt, tb/, student/, summary.json, curves.png. "
                     "Re-running resumes (log.txt is appended to). "
                     "An existing file is refused.")
@distill_option("--mode", type=Registered("mcad_student.train:MODES", "mode"),
                help="Targets and loss terms (mcad_student/train.py MODE_TERMS): fused_kd is itc + kd to the fused "
                     "top-k targets, mcad adds fd + ia (see the README's stage-2 table).")
@distill_option("--steps", type=int,
                help="Optimizer steps in total, at least 1 (a resumed run continues to this count).")
@distill_option("--batch-size", type=int,
                help="Images per step, at least 2 (the other images are the negatives) and at most the images of "
                     "the store's largest block (a batch is drawn from one block).")
@distill_option("--lr", type=float, help="Peak learning rate (warmup, then cosine decay to 0).")
@distill_option("--image-lr-scale", type=float, help="LR multiplier of the image tower.")
@distill_option("--warmup", type=int, help="Linear LR warmup steps (then cosine decay).")
@distill_option("--seed", type=int, help="Seed of the initialization and of the batch order.")
@distill_option("--alpha", type=click.FloatRange(min=0), field="loss.alpha", help="Weight of the kd term.")
@distill_option("--beta", type=click.FloatRange(min=0), field="loss.beta",
                help="Weight of the fd (feature alignment) term.")
@distill_option("--gamma", type=click.FloatRange(min=0), field="loss.gamma",
                help="Weight of the ia (interactive alignment) term.")
@distill_option("--kd-temperature", type=float, field="loss.kd_temperature",
                help="Temperature of kd's target and student logits (and of the ia target); positive.")
@distill_option("--kd-kind", type=click.Choice(KD_KINDS), field="loss.kd_kind",
                help="kd over the whole row (MCAD) or over the non-matching pairs only (decoupled KD).")
@distill_option("--kd-direction", type=click.Choice(KD_DIRECTIONS), field="loss.kd_direction",
                help="Which in-batch distributions kd matches: both (MCAD), or image-to-text or text-to-image "
                     "rows alone (that direction's KL, so --alpha halved keeps its pull as in both).")
@distill_option("--ia-direction", type=click.Choice(KD_DIRECTIONS), field="loss.ia_direction",
                help="Which target distributions ia matches, as --kd-direction for kd (one direction alone: "
                     "--gamma halved keeps its pull).")
@distill_option("--ammkd-weighting", type=click.Choice(AMMKD_WEIGHTINGS), field="loss.ammkd_weighting",
                help="Mode ammkd's per-step teacher weights: min_norm (AMMKD's) or confidence (softmax of minus "
                     "each teacher's cross-entropy on the batch's true pairs).")
@distill_option("--student", "student_preset",
                type=Registered("mcad_student.model:STUDENT_PRESETS", "student preset"), field="student",
                shown=_preset_name,
                help="A named student (mcad_student/model.py STUDENT_PRESETS, where each is described; the MobileViT "
                     "one trains from scratch only with --image-lr-scale 5).")
@distill_option("--batching", type=click.Choice(BATCHINGS),
                help="neighbor: each anchor with its cached candidates (hard negatives, the fused targets "
                     "in-batch); random: plain shuffles within a block.")
@distill_option("--batch-neighbors", type=click.IntRange(min=0),
                help="With --batching neighbor: how many of each anchor's top cached candidates pull their images "
                     "into its batch (unset: all k; 0: random batches).")
@distill_option("--image-model", field="student.image_model",
                help="Image tower of the student: 'vit' (open_clip's ViT) or a timm model name.")
@distill_option("--eval-shards", shown=lambda value: value or "the val split beside the store's source shards",
                help="Shards the final (and periodic) recall is measured on (data/W/val for a store of data/W/train).")
@click.option("--shards", help="Directory that now holds the store's source shards, if they moved since `mcad cache` "
                               "(default: the paths the store records, absolute or relative to the store). Found by "
                               "file name and checked against the store's fingerprints before the first step.")
@click.option("--tokenizer", help="Directory that now holds the store's tokenizer, if it moved (checked by hash).")
@click.option("--fusion", "fusion_rule", type=FUSION,
              help="Re-derive the fused targets with this rule (mcad_cache/fusion.py FUSION_RULES) from the "
                   "cached dual and ITM logits [default: the cache's rule].")
@distill_option("--fusion-a", type=float,
                help="The --fusion rule's weight a (needs --fusion; checked against the rule's range).")
@distill_option("--eval-every", type=int, help="Evaluate every N steps (0: only at the end).")
@distill_option("--checkpoint-every", type=int, help="Write checkpoint.pt every N steps.")
@distill_option("--device", help="Where the student trains: auto (cuda:$LOCAL_RANK when CUDA is available, else "
                                  "cpu), cpu, cuda (this rank's GPU) or cuda:N; checked before any work. A run may "
                                  "resume on another device.")
@distill_option("--precision", type=click.Choice(PRECISIONS),
                help="fp32, or autocast on the device to bfloat16 (amp-bf16) or float16 with a gradient scaler "
                     "(amp-fp16, CUDA only).")
@distill_option("--amp/--no-amp", default=None, help="The old spelling of --precision amp-bf16 / fp32.")
@distill_option("--threads", type=int, help="torch CPU threads (0: torch's default).")
@click.option("--teacher-table", type=click.Path(path_type=Path), default=Path("artifacts/eval/teachers.json"),
              show_default=True, help="`mcad eval` output whose rows are printed beside the student's when it "
                                      "was measured on the same shards.")
@click.option("--results-json", type=click.Path(path_type=Path), default=None,
              help="Also write the student's and the teachers' test figures here (mean recall, parameters, and "
                   "the student's steps and seconds): what `make distill` keeps in bench/results/distill.json.")
def distill(config_file: Path | None, teacher_table: Path, results_json: Path | None, **options) -> None:
    """Stage 2: train a student from the cache alone (no teacher is loaded).

    Prints the student's recalls on --eval-shards; everything else lands in --out.
    """
    from mcad_cache.sources import TokenizerMismatchError
    from mcad_cache.store import CacheMismatchError
    from mcad_student.data import CacheJoinError
    from mcad_student.losses import LossWeights
    from mcad_student.model import STUDENT_PRESETS
    from mcad_student.parallel import ParallelSetupError
    from mcad_student.train import DistillConfig, NonFiniteLossError, ResumeMismatchError, check_inputs
    from mcad_student.train import distill as run_distill
    from mcad_core.config import load_config_file

    try:
        cfg = load_config_file(config_file, DistillConfig) if config_file else DistillConfig()
        amp = options.pop("amp")
        if amp is not None:  # --amp / --no-amp: precision amp-bf16 / fp32, unless --precision says otherwise
            implied = "amp-bf16" if amp else "fp32"
            if options["precision"] not in (None, implied):
                raise click.UsageError(f"--{'' if amp else 'no-'}amp means --precision {implied}, which contradicts "
                                       f"--precision {options['precision']}; give one of them")
            options["precision"] = implied
        loss_keys = {f.name for f in dataclasses.fields(LossWeights)}
        loss = {k: v for k, v in options.items() if k in loss_keys and v is not None}
        student = {"image_model": options["image_model"]} if options.get("image_model") else {}
        top = {k: v for k, v in options.items()
               if k not in loss_keys | {"image_model", "student_preset"} and v is not None}
        base = STUDENT_PRESETS[options["student_preset"]] if options.get("student_preset") else cfg.student
        cfg = replace(cfg, **top, loss=replace(cfg.loss, **loss), student=replace(base, **student))
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    problem = distill_config_problem(cfg, fusion_a_given=options.get("fusion_a") is not None)
    if problem:
        raise click.UsageError(problem)
    try:
        inputs = check_inputs(cfg)  # a missing or changed input is named first (exit 3); the store is opened once
        cfg = replace(cfg, eval_shards=inputs.eval_shards)
        if problem := batch_size_problem(inputs.store, cfg.batch_size):
            raise click.UsageError(problem)
        summary = run_distill(cfg, inputs=inputs)
    except ParallelSetupError as err:  # a device this machine lacks, a batch that does not split over the ranks
        raise click.UsageError(str(err)) from err
    except (CacheMismatchError, ResumeMismatchError, NonFiniteLossError, FileNotFoundError, TokenizerMismatchError,
            CacheJoinError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    if "recalls" not in summary:  # a non-zero torchrun rank: rank 0 reports
        return
    from pipeline.jobs import format_table

    click.echo(f"{cfg.mode}: {summary['steps']} steps in {summary['seconds']:.0f}s "
               f"({summary['steps_per_second']:.2f} steps/s), {summary['parameters'] / 1e6:.2f}M parameters, "
               f"{100 * (summary['candidates_in_batch'] or 0):.1f}% of cached candidates in-batch")
    teacher_rows = _teacher_rows(teacher_table, cfg.eval_shards)
    rows = {f"student ({cfg.mode})": {**summary["recalls"], "parameters": summary["parameters"]}, **teacher_rows}
    click.echo(format_table(rows))
    if results_json is not None:
        from mcad_core.atomic import atomic_write_json

        student = {"mean_recall": summary["recalls"]["mean_recall"], "params": summary["parameters"],
                   "steps": summary["steps"], "seconds": summary["seconds"], "mode": cfg.mode,
                   "eval_shards": cfg.eval_shards}
        teachers = {name: {"mean_recall": row["mean_recall"], "params": row.get("parameters")}
                    for name, row in teacher_rows.items()}
        best = max((row["mean_recall"] for row in teachers.values()), default=None)
        atomic_write_json(results_json, {"student": student, "teachers": teachers,
                                         "of_best_teacher": round(student["mean_recall"] / best, 4) if best else None})
    click.echo(f"student saved as {summary['student']}; run directory {cfg.out_dir} (its log.txt, curves.png)")


def distill_config_problem(cfg, fusion_a_given: bool = False) -> str | None:
    """What makes ``cfg`` (a DistillConfig) unusable that it cannot check alone, or None; reads no shard and
    creates nothing, so `mcad distill` refuses it (exit 2) before the run directory exists.

    Negative loss weights; a --fusion weight outside its rule's range (the rule itself says, on a 1x1 probe)
    or --fusion-a without --fusion; an --out that is a file. The batch size against the store is
    ``batch_size_problem``'s, after the input checks.
    """
    for field in dataclasses.fields(cfg.loss):
        value = getattr(cfg.loss, field.name)
        if "term" in field.metadata and not value >= 0:
            return f"{field.name} (the weight of {field.metadata['term']}) must be 0 or more, got {value}"
    if cfg.fusion_rule is None:
        if fusion_a_given:
            return ("--fusion-a is the weight of a --fusion rule: name the rule with --fusion (the cache's own "
                    "rule keeps the cache's weight)")
    elif problem := _fusion_weight_problem(cfg.fusion_rule, cfg.fusion_a):
        return f"--fusion {cfg.fusion_rule} --fusion-a {cfg.fusion_a}: {problem}"
    return _run_directory_problem(Path(cfg.out_dir))


def _fusion_weight_problem(rule: str, a: float) -> str | None:
    """Why fusion ``rule`` refuses weight ``a`` (the rule's own ValueError on 1x1 logits), or None."""
    import math

    import torch

    from mcad_cache.fusion import fuse

    if not math.isfinite(a):
        return f"the weight a must be a finite number, got {a}"
    try:
        fuse(rule, torch.zeros(1, 1), torch.zeros(1, 1), a)
    except ValueError as err:
        return str(err)
    return None


def _run_directory_problem(out: Path) -> str | None:
    """Why ``out`` cannot be (or become) a run directory: it, or the nearest existing path above it, is no
    directory. None when it can."""
    for path in (out, *out.absolute().parents):
        if path.exists():
            if path.is_dir():
                return None
            if path == out:
                return f"--out {out} is an existing file, not a run directory: name a new or existing directory"
            return f"--out {out} cannot be created: {path} is a file, not a directory"
    return None


def batch_size_problem(store, batch_size: int) -> str | None:
    """Whether the store (a ``CacheStore`` already open, or its path) can give batches of ``batch_size`` images: a
    batch is drawn from one block, so it can hold at most the images of the largest block (counted from the shard
    done markers; no array is read).

    None also when the store is missing, not a store or unfinished: the run's own input checks name those
    (exit 3).
    """
    from mcad_cache.store import CacheStore

    if isinstance(store, CacheStore):
        store_path = store.path
    else:
        store_path = Path(store)
        if not (store_path / "zarr.json").exists():
            return None
        try:
            store = CacheStore.open(store_path)
        except ValueError:  # not an MCAD store, or another schema: check_inputs refuses it by name
            return None
    blocks = store.manifest["search"]["blocks"]
    status = {name: store.shard_status(name) for block in blocks for name in block}
    if not status or not all(s.get("done") for s in status.values()):
        return None
    sizes = [sum(status[name].get("samples", 0) for name in block) for block in blocks]
    if batch_size <= max(sizes):
        return None
    where = (f"at most {max(sizes)} in one of its {len(sizes)} blocks, and a batch is drawn from one block"
             if len(sizes) > 1 else "all in one block")
    return (f"batch_size {batch_size} is more than the store {store_path} can give: it holds {sum(sizes)} images "
            f"({where}); use --batch-size {max(sizes)} or less")


def _teacher_rows(path: Path, eval_shards: str) -> dict:
    """Rows of a saved `mcad eval` table measured on the same shards as the student (else none)."""
    from mcad_core.shards import list_shards

    if not path.exists():
        return {}
    saved = json.loads(path.read_text())

    def resolved(shards) -> list[str]:  # the same files, however the paths were written
        return sorted(os.path.realpath(s) for s in shards)

    if resolved(saved.get("shards", [])) != resolved(list_shards(eval_shards)):
        click.echo(f"note: {path} was measured on other shards than {eval_shards}: no teacher rows", err=True)
        return {}
    return saved.get("results", {})


@main.command()
@click.option("--store", type=click.Path(path_type=Path), default=Path("artifacts/cache/default.zarr"),
              show_default=True, help="The cache store every row trains from (not read with --report-only).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/ablation"), show_default=True,
              help="Receives one run directory per row and seed, and ablation.{json,md,png}.")
@distill_option("--steps", type=int, default=None,
                help="Steps of every row (equal steps), as `mcad distill --steps`. Not needed with --report-only, "
                     "which reads each run's steps from its config.json (given, it must match them).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds; each row runs once per seed.")
@click.option("--rows", default="a,b,c,d,e,f", show_default=True, help="Which rows: a..f (see the README).")
@click.option("--online-seeds", default="0", show_default=True,
              help="Seeds of the online row (f), which runs the teachers every step and is much slower.")
@click.option("--eval-shards", default="",
              help="Shards every row's recall is measured on (default: the val split beside the store's source "
                   "shards; with --report-only: read from the runs).")
@click.option("--report-only", is_flag=True,
              help="Train nothing and load no model: the table of the runs already finished under --out (others, "
                   "e.g. still training in another process, are left out). Steps, batch size and eval shards come "
                   "from the runs' own config.json, so no training option needs repeating; none finished: exit 3.")
def ablation(store: Path, out_dir: Path, steps: int, seeds: str, rows: str, online_seeds: str,
             eval_shards: str, report_only: bool) -> None:
    """Train every MCAD variant at equal steps from one cache; write a table and a plot.

    Rows: (a) contrastive only, (b) + CLIP KD, (c) + single-stream top-k fused targets,
    (d) full MCAD (+ fd + ia), (e) AMMKD with two CLIPs and adaptive weights,
    (f) full MCAD with the teachers in the loop (online). Finished rows are reused.
    """
    from pipeline.ablation import ROWS, StaleRowError, write_report

    seed_list, online_list = _int_list(seeds, "--seeds"), _int_list(online_seeds, "--online-seeds")
    row_list = tuple(r.strip() for r in rows.split(",") if r.strip())
    if unknown := sorted(set(row_list) - {label for label, _, _ in ROWS}):
        raise click.BadParameter(f"unknown rows {unknown}; rows are {', '.join(label for label, _, _ in ROWS)}",
                                 param_hint="--rows")
    if report_only:  # no torch on this path: the runs' own files say everything the table needs
        from pipeline.ablation import finished_runs

        try:
            results, settings = finished_runs(out_dir, seed_list, row_list, online_seeds=online_list)
        except StaleRowError as err:
            raise click.ClickException(str(err)) from err
        if steps is not None and steps != settings["steps"]:
            raise click.UsageError(f"--steps {steps}: the runs under {out_dir} trained {settings['steps']} steps "
                                   "(--report-only reads them from the runs; leave --steps out)")
        row_steps, batch_size, eval_shards = settings["steps"], settings["batch_size"], settings["eval_shards"]
        lr = settings["lr"]
        seeds_text = f"the finished runs of seeds {list(seed_list)} (the seeds column counts them)"
    else:
        from mcad_student.train import DistillConfig, ResumeMismatchError, check_inputs
        from pipeline.ablation import run_ablation

        try:
            base = DistillConfig(store=store, eval_shards=eval_shards,
                                 **({"steps": steps} if steps is not None else {}))
        except ValueError as err:
            raise click.UsageError(str(err)) from err
        try:
            eval_shards = check_inputs(base).eval_shards  # a missing input: exit 3 before any row trains
        except (FileNotFoundError, ValueError) as err:  # shards, store, tokenizer: named, as `mcad distill` does
            click.echo(f"error: {err}", err=True)
            sys.exit(3)
        base = replace(base, eval_shards=eval_shards)
        try:
            results = run_ablation(base, out_dir, seed_list, row_list, online_seeds=online_list)
        except (StaleRowError, ResumeMismatchError) as err:
            raise click.ClickException(str(err)) from err
        row_steps, batch_size, lr, seeds_text = base.steps, base.batch_size, base.lr, f"seeds {list(seed_list)}"
    lr_text = f"peak lr {lr:g}, " if lr is not None else ""
    note = (f"{row_steps} steps per row, batch {batch_size}, {lr_text}{seeds_text} (online row: "
            f"{list(online_list)}), recalls on {relative_to_cwd(eval_shards)} (mean ± sd over seeds).")
    table = write_report(results, out_dir, note)
    click.echo((out_dir / "ablation.md").read_text())
    click.echo(f"wrote {out_dir}/ablation.json, ablation.md, ablation.png ({len(table)} rows)")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated integers (e.g. --seeds 0,1,2); a bad item is a usage error naming the option."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None


@main.command("export")
@click.option("--student", "student_dir", required=True, type=click.Path(path_type=Path),
              help="A saved student directory (e.g. runs/default/student).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Receives open_clip/, TorchScript and ONNX encoders, tokenizer/ and export.json. An existing "
                   "OUT is replaced only if it is empty or an earlier `mcad export` output, else refused (exit 3).")
@click.option("--batch", type=int, default=8, show_default=True, help="Inputs per tower in the equality check.")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Largest allowed |torch - TorchScript| and |torch - onnxruntime| on normalized embeddings.")
def export_cmd(student_dir: Path, out_dir: Path, batch: int, atol: float) -> None:
    """Export a student: open_clip checkpoint, TorchScript + ONNX image/text encoders, tokenizer.

    The encoders are checked against the torch student before OUT is replaced;
    a difference above --atol fails (exit 3) and leaves OUT as it was. So does an
    OUT that is not an earlier export (or empty), or that overlaps the student.
    """
    from mcad_core.atomic import OutputDirError
    from pipeline.export import ExportError, export_student

    try:
        manifest = export_student(student_dir, out_dir, batch=batch, atol=atol)
    except (ExportError, OutputDirError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    diffs = manifest["check"]["max_abs_diff"]
    shown = ", ".join(f"{b} {k} {d:.2g}" for b, row in diffs.items() for k, d in row.items())
    click.echo(f"exported {student_dir} -> {out_dir} (export {manifest['export_id']}); max |diff|: {shown} "
               f"(atol {atol:g})")


@main.command("index")
@click.option("--export", "export_dir", required=True, type=click.Path(path_type=Path),
              help="Directory written by `mcad export`.")
@click.option("--shards", required=True, help="Shard directory, tar file or brace pattern of the gallery images.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Index directory to write. An existing OUT is replaced only if it is empty or an earlier "
                   "`mcad index` output, else refused (exit 3); it must not overlap the export or the shards.")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per ONNX image-encoder call.")
@click.option("--threads", type=int, default=0, show_default=True, help="onnxruntime threads (0: its default).")
@click.option("--on-error", type=click.Choice(["raise", "warn"]), default="raise", show_default=True,
              help="Bad samples or shards: stop naming shard and key (raise), or skip and count them (warn).")
def index_cmd(export_dir: Path, shards: str, out_dir: Path, batch: int, threads: int, on_error: str) -> None:
    """Embed every image of a shard set with the exported ONNX image encoder (float16 index)."""
    from mcad_core.atomic import OutputDirError
    from pipeline.search import SearchIndexError, build_index
    from mcad_core.shards import ShardReadError

    try:
        index = build_index(export_dir, shards, out_dir, batch=batch, threads=threads, policy=on_error)
    except (SearchIndexError, ShardReadError, FileNotFoundError, OutputDirError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    click.echo(f"indexed {index['count']} images ({index['embed_dim']}-d float16) -> {out_dir}"
               + (f"; skipped {index['skipped']} bad samples" if index["skipped"] else ""))


@main.command("search")
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path),
              help="Directory written by `mcad index`.")
@click.option("--query", required=True, help="The text to search images for.")
@click.option("-k", "--k", "k", type=int, default=10, show_default=True, help="Results to return.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=None,
              help="Export directory to use instead of the one recorded in the index.")
@click.option("--scorer", type=click.Choice(["faiss", "onnxruntime", "numpy"]), default="faiss", show_default=True,
              help="How the gallery is scored, all exactly (float32 dot products of the stored float16 rows): faiss "
                   "holds the gallery in memory (fastest); onnxruntime and numpy scan it from disk in chunks "
                   "(lower peak RSS).")
def search_cmd(index_dir: Path, query: str, k: int, as_json: bool, export_dir: Path | None, scorer: str) -> None:
    """Top-k images for a text query. Loads neither torch nor transformers (tokenizers, onnxruntime, faiss, numpy)."""
    if k < 1:
        raise click.BadParameter("k must be >= 1", param_hint="-k")
    if problem := _text_problem(query):
        raise click.BadParameter(problem, param_hint="--query")
    from pipeline.search import Searcher, SearchIndexError

    try:
        hits = Searcher(index_dir, export_dir=export_dir, scorer=scorer).query(query, k)
    except SearchIndexError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(3)
    if as_json:
        click.echo(json.dumps({"query": query, "results": [{"key": h.key, "score": h.score} for h in hits]}))
    else:
        click.echo("\n".join(f"{rank:>3}  {h.score:.4f}  {h.key}" for rank, h in enumerate(hits, 1)))


def _text_problem(text: str) -> str | None:
    """Why ``text`` is no query text, or None: undecodable bytes (a non-UTF-8 argument reaches Python as
    surrogate escapes, which no tokenizer or JSON output can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        try:
            raw = repr(text.encode("utf-8", "surrogateescape"))  # the bytes as they were given
        except UnicodeEncodeError:
            raw = ascii(text)
        return (f"not UTF-8 text: {raw} has undecodable bytes at character {err.start}; pass the query in "
                "UTF-8 (check the terminal's or the script's encoding)")
    return None


if __name__ == "__main__":
    main()
