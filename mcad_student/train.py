"""Stage 2, `mcad distill`: train a small dual-stream student from the cache alone.

One loop serves every ablation row; ``mode`` picks the targets and loss terms:

    contrastive   itc only                                             (a)
    dual_kd       itc + kd to the fixed-weight CLIP ensemble            (b)
    fused_kd      itc + kd to targets with the fused top-k entries      (c)
    mcad          itc + kd(fused) + fd + ia                             (d)
    ammkd         itc + kd to each CLIP with adaptive min-norm weights  (e)

Checkpoints are written atomically every ``checkpoint_every`` steps and hold
the resolved config, step, model, optimizer, scheduler, RNG state, the data
position and every metrics row so far, so a killed run resumes exactly where it
stopped and metrics.csv is rebuilt from the checkpoint (see ``MetricsLog``).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mcad_cache.fusion import FUSION_RULES
from mcad_cache.sources import locate_shards, locate_tokenizer
from mcad_cache.store import CacheStore
from mcad_student.choices import BATCHINGS, PRECISIONS
from mcad_student.data import CacheBatches, Position
from mcad_student.losses import LossWeights, ammkd_kd_loss, fd_loss, ia_loss, itc_loss, kd_loss, total_loss
from mcad_student.model import STUDENT_PRESETS, Student, StudentConfig, build_student, save_student
from mcad_student.parallel import DeviceUnavailableError, Parallel, check_split, resolve_device
from mcad_core.errors import InputError
from mcad_core.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from mcad_core.lock import main_rank_writer_lock
from mcad_core.runlog import RunLog
from mcad_core.config import from_dict
from mcad_core.optim import adamw_warmup_cosine

log = logging.getLogger(__name__)

# The weighted loss terms each mode adds to itc; None: every registered term whose weight is non-zero.
MODE_TERMS: dict[str, tuple[str, ...] | None] = {
    "contrastive": (), "dual_kd": ("kd",), "fused_kd": ("kd",), "mcad": None, "ammkd": ("kd",)}
MODES = tuple(MODE_TERMS)


class NonFiniteLossError(RuntimeError):
    """Too many steps produced a NaN/inf loss; the run stops instead of training on garbage."""


class ResumeMismatchError(ValueError):
    """A checkpoint in the output directory was made with a different config."""


class DistillConfigError(ValueError):
    """A DistillConfig value no run can use (e.g. a batch too small for in-batch negatives)."""


@dataclass(frozen=True)
class DistillConfig:
    store: Path = Path("artifacts/cache/default.zarr")
    out_dir: Path = Path("runs/default")
    # Full MCAD: itc + kd to the fused top-k targets + fd + ia to the integrated features, the best of the modes
    # against the shipped teachers (docs/results.md, "The regime", 3 seeds).
    mode: str = "mcad"
    # The ViT preset: 1.01M parameters, no larger than the default world's CLIP teachers, and it trains from
    # scratch (MobileViTv2-050 from scratch reached 3.2 mean recall where this tower reached 21.5; docs/experiments.md).
    student: StudentConfig = STUDENT_PRESETS["vit"]
    loss: LossWeights = LossWeights()
    steps: int = 1500
    batch_size: int = 128
    # Peak LR. 1e-3 against the shipped teachers: mcad 79.8 / 79.3 / 81.9 on seeds 0-2, where 5e-4 left the
    # student under-trained (66.9 / 61.5 / 76.9; docs/experiments.md).
    lr: float = 1e-3
    # LR multiplier of the image tower: 1 for the ViT preset. From scratch, the mobilevit preset's narrow
    # depthwise backbone barely moves at the text tower's LR and wants 5 (docs/experiments.md, "Why the image tower gets
    # a higher LR").
    image_lr_scale: float = 1.0
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: only at the end
    # "" (the default): the `val` split beside the store's source shards, as `mcad data` lays a world out
    # (<world>/train, <world>/val); a store whose shards lie elsewhere needs it named (``default_eval_shards``).
    eval_shards: str = ""
    max_nan_skips: int = 20
    # Where the student trains: "auto" (cuda:$LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" (this
    # rank's GPU) or "cuda:N". A "where", not a "what": a run may resume on another device (RESUMABLE_CHANGES).
    device: str = "auto"
    # "fp32", or autocast on the device's type to bfloat16 ("amp-bf16": pays on CUDA, on CPU usually slower) or
    # float16 ("amp-fp16": CUDA only, with a GradScaler).
    precision: str = "fp32"
    # The old spelling of precision "amp-bf16" (configs saved before precision existed, `--amp`): read as it,
    # then stored as False, so a config says its precision one way only.
    amp: bool = False
    threads: int = 0
    on_error: str = "warn"
    # Where the store's sources now are, when they moved since `mcad cache` (None: the paths the store
    # records, absolute or relative to the store). Either way they are checked against the store's
    # fingerprints (shards) and hash (tokenizer) before the first step.
    shards: str | None = None
    tokenizer: str | None = None
    # Re-derive the fused list logits with this rule (and weight a) from the cached dual and ITM logits,
    # instead of the rule the cache was made with (None: the cache's). See mcad_cache/fusion.py.
    fusion_rule: str | None = None
    fusion_a: float = 1.0
    # "random": plain shuffles within a block. "neighbor": anchors with their cached candidates, whose in-batch
    # targets pick the true pair only ~22 % of the time (contrast twins the CLIPs cannot tell apart). With
    # neighbour batches the ViT student reached 37.6 test mean recall; with random ones 54.0 (docs/results.md, stage 2).
    batching: str = "random"
    # With batching "neighbor": how many of each anchor's top cached candidates pull their images into its batch
    # (None: all k). Few make batches of small confusable groups among random ones; 0 is random batching.
    batch_neighbors: int | None = None
    online: bool = False  # the baseline: the cache's teachers run in the loop instead of reading its targets

    def __post_init__(self) -> None:
        """Refuse values that would hang, divide by zero or waste a run, before any work (config files too)."""
        if self.mode not in MODES:
            raise DistillConfigError(f"unknown mode {self.mode!r}; known: {list(MODES)}")
        if self.mode == "ammkd" and self.loss.kd_kind != "full":
            raise DistillConfigError("ammkd's adaptive weights are derived for kd_kind 'full' only")
        _require(not self.online or self.mode == "mcad",
                 f"the online baseline runs mode 'mcad' only, got {self.mode!r}")
        _require(self.batching in BATCHINGS, f"batching must be one of {BATCHINGS}, got {self.batching!r}")
        _require(self.batch_neighbors is None or self.batch_neighbors >= 0,
                 f"batch_neighbors must be >= 0 (or unset: all k), got {self.batch_neighbors}")
        _require(self.on_error in ("warn", "raise"), f"on_error must be 'warn' or 'raise', got {self.on_error!r}")
        # A batch of one has no in-batch negative, so the loop skips it; with batch_size 1 (or <= 0)
        # every batch is skipped and the run never reaches a step.
        _require(self.batch_size >= 2, f"batch_size must be at least 2 (in-batch negatives), got {self.batch_size}")
        _require(self.steps >= 1, f"steps must be at least 1 (0 would save an untrained student), got {self.steps}")
        _require(self.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        _require(self.eval_every >= 0, f"eval_every must be 0 (only at the end) or more, got {self.eval_every}")
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(self.image_lr_scale >= 0, f"image_lr_scale must be 0 (frozen) or more, got {self.image_lr_scale}")
        _require(self.warmup >= 0, f"warmup must be 0 or more steps, got {self.warmup}")
        _require(self.weight_decay >= 0, f"weight_decay must be 0 or more, got {self.weight_decay}")
        _require(self.max_nan_skips >= 0, f"max_nan_skips must be 0 or more, got {self.max_nan_skips}")
        _require(self.threads >= 0, f"threads must be 0 (torch's default) or more, got {self.threads}")
        _require(self.fusion_rule is None or self.fusion_rule in FUSION_RULES,
                 f"unknown fusion rule {self.fusion_rule!r}; known: {sorted(FUSION_RULES)}")
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.amp:
            _require(self.precision in ("fp32", "amp-bf16"), f"amp (the old spelling of precision 'amp-bf16') "
                                                             f"contradicts precision {self.precision!r}; drop amp")
            object.__setattr__(self, "precision", "amp-bf16")
            object.__setattr__(self, "amp", False)
        _require(_device_spec_ok(self.device),
                 f"device must be auto, cpu, cuda or cuda:N (N = 0, 1, ...), got {self.device!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    def effective_loss(self) -> LossWeights:
        """The loss weights this mode actually uses (terms a mode does not have are zeroed, settings only they
        read are at their defaults)."""
        return self.loss.used_by(MODE_TERMS[self.mode])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DistillConfigError(message)


def _device_spec_ok(spec: str) -> bool:
    """Is ``spec`` a device this code knows how to train on (whether this machine has it is checked at run time)?"""
    if not isinstance(spec, str):
        return False
    kind, _, index = spec.partition(":")
    return spec in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit() and index == str(int(index)))


AUTOCAST_DTYPES = {"fp32": None, "amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: fp32), or a DeviceUnavailableError naming what
    that device cannot do: float16 autocast is CUDA-only here (CPU float16 matmuls are slow and it needs a
    GradScaler), and bfloat16 needs a GPU that supports it."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise DeviceUnavailableError(f"precision amp-fp16 needs a CUDA device, the run is on {device}; use "
                                     "--precision amp-bf16 or fp32 there")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailableError(f"{device} does not support bfloat16; use --precision amp-fp16 or fp32")
    return dtype


@dataclass(frozen=True)
class DistillInputs:
    """What ``check_inputs`` found, handed down so that nothing is opened or looked up twice: the store (opened and
    validated once), its source shards' current paths by name (fingerprints checked) and the tokenizer directory."""

    store: CacheStore
    paths: dict[str, str]
    tokenizer_dir: str
    eval_shards: str  # the config's, or the split ``default_eval_shards`` found for it


class NoEvalShardsError(InputError, FileNotFoundError):
    """No --eval-shards given, and no `val` split beside the store's source shards to default to."""


def default_eval_shards(source_paths: list[str]) -> str:
    """The `val` split beside the store's source shards: ``<world>/val`` for shards in ``<world>/<split>/``, as
    `mcad data` writes a world (so a student of any world is measured on that world's val split, never on the
    default world's). Relative to the working directory when it lies inside it. Raises ``NoEvalShardsError`` when
    the shards share no parent directory or no shard file lies in its sibling ``val``."""
    from mcad_core.paths import relative_to_cwd
    from mcad_core.shards import NoShardsError, list_shards

    parents = {Path(p).absolute().parent for p in source_paths}
    val = next(iter(parents)).parent / "val" if len(parents) == 1 else None
    if val is not None and val not in parents:
        try:
            list_shards(val)
        except NoShardsError:
            pass
        else:
            return relative_to_cwd(val)
    where = ", ".join(sorted(str(p) for p in parents))
    raise NoEvalShardsError(f"no --eval-shards given and no val split beside the store's source shards ({where}): "
                            "name the shards the student is measured on with --eval-shards")


def check_inputs(cfg: DistillConfig) -> DistillInputs:
    """Fail in seconds, and before the run directory exists, when an input the run needs is missing.

    Without this a missing --eval-shards surfaced only after training, at the final evaluation. Every
    run that finishes evaluates, so the shards are checked always. The store's own source shards are
    found and checked against their fingerprints, and its tokenizer against its hash, so data changed or
    moved since `mcad cache` is named here, not part-way through training. Raises FileNotFoundError (a
    ``NoShardsError``, ``SourceShardsError`` or ``NoEvalShardsError``) or ``TokenizerMismatchError``; creates nothing.
    Returns what it found (the open store, source shard paths, tokenizer directory) for the run to use.
    """
    from mcad_core.shards import list_shards

    store = CacheStore.open(cfg.store)  # "no cache store at ... (run `mcad cache` first)" when absent
    paths = locate_shards(store.manifest, store.path, cfg.shards)  # missing or changed shards: SourceShardsError
    tokenizer_dir = locate_tokenizer(store.manifest, store.path, cfg.tokenizer)
    eval_shards = cfg.eval_shards or default_eval_shards(list(paths.values()))
    list_shards(eval_shards)
    return DistillInputs(store, paths, tokenizer_dir, eval_shards)


@dataclass
class RunState:
    step: int = 0
    position: Position = field(default_factory=Position)
    nan_skips: int = 0
    seconds: float = 0.0
    # One dict per step 1..step (str keys; int/float values, so a checkpoint stays weights_only-loadable).
    metrics: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------- loss of one batch


@dataclass
class StepView:
    """What a loss term reads for one global batch: the batch, the student's outputs and the weights."""

    student: Student
    batch: dict
    out: dict  # the student's forward: image, text (normalized), *_raw, logit_scale
    logits: torch.Tensor  # (B, B) the student's i2t logits
    weights: LossWeights
    teachers: tuple[str, ...]
    mode: str

    @property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (i2t, t2i) target logits of the mode's teacher ensemble."""
        return self.batch["targets"]["ensemble"]

    @property
    def teacher_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch["integrated_image"], self.batch["integrated_text"]

    @functools.cached_property
    def student_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's features projected to the integrated features' width (computed once per step)."""
        return self.student.project(self.out["image_raw"], 0), self.student.project(self.out["text_raw"], 1)


LossTerm = Callable[[StepView], dict]
# name -> function of a weighted loss term; its weight is the LossWeights field whose metadata names it.
LOSS_TERMS: dict[str, LossTerm] = {}


def loss_term(name: str) -> Callable[[LossTerm], LossTerm]:
    """Register a loss term; with a ``LossWeights`` field weighing it, that is all a new term needs."""

    def add(term: LossTerm) -> LossTerm:
        LOSS_TERMS[name] = term
        return term

    return add


@loss_term("kd")
def _kd_term(v: StepView) -> dict:
    if v.mode == "ammkd":
        return ammkd_kd_loss(v.logits, [v.batch["targets"][t] for t in v.teachers], v.weights.kd_temperature, None,
                             v.weights.kd_direction, v.weights.ammkd_weighting)
    i2t, t2i = v.targets
    return kd_loss(v.logits, i2t, t2i, v.weights.kd_temperature, v.weights.kd_kind,
                   v.weights.kd_direction)


@loss_term("fd")
def _fd_term(v: StepView) -> dict:
    return fd_loss(*v.student_features, *v.teacher_features, v.weights.fd_kind)


@loss_term("ia")
def _ia_term(v: StepView) -> dict:
    return ia_loss(*v.student_features, *v.teacher_features, *v.targets, v.weights.ia_temperature,
                   v.weights.kd_temperature, v.weights.ia_direction)


def batch_terms(student: Student, batch: dict, cfg: DistillConfig, teachers: tuple[str, ...],
                par: Parallel = Parallel()) -> dict:
    """Every loss term of one global batch; under torchrun this rank encodes only its rows (see parallel.py).

    A batch from ``CacheBatches(rank=, world=)`` holds pixels, tokens and target rows of this rank's positions
    ``batch["local"]`` only; the target rows are gathered here, so every rank sees the global batch's targets.
    A whole batch (one process, or no "local") holds every position, and this rank encodes its share of them.
    """
    weights = cfg.effective_loss()
    n = len(batch["rows"])
    mine = par.local_rows(n)
    held = batch.get("local")
    if par.world == 1:
        pixels, input_ids = batch["pixels"], batch["input_ids"]
    elif held is None or len(held) == n:  # a whole batch: this rank encodes its share
        pixels, input_ids = batch["pixels"][mine], batch["input_ids"][mine]
    elif torch.equal(held.cpu(), mine):  # this rank's rows already: gather the target rows of every rank
        pixels, input_ids = batch["pixels"], batch["input_ids"]
        targets = {name: tuple(par.gather(t, n, grad=False) for t in pair) for name, pair in batch["targets"].items()}
        batch = {**batch, "targets": targets}
    else:
        raise ValueError(f"the batch holds positions {held.tolist()[:4]}..., rank {par.rank} of {par.world} encodes "
                         f"{mine.tolist()[:4]}...: build CacheBatches with this rank and world")
    local = student(student.pixels_from_uint8(pixels), input_ids)
    out = {k: v if k == "logit_scale" else par.gather(v, n) for k, v in local.items()}
    logits = out["logit_scale"] * out["image"] @ out["text"].t()
    terms = dict(itc_loss(out["image"], out["text"], out["logit_scale"]))
    view = StepView(student, batch, out, logits, weights, teachers, cfg.mode)
    term_weights = weights.term_weights()
    for name, term in LOSS_TERMS.items():
        if term_weights.get(name):
            terms.update(term(view))
    terms["loss"] = total_loss({k: v for k, v in terms.items() if "/" not in k}, weights)
    return terms


def optimizer_step(student: Student, optimizer, scheduler, loss: torch.Tensor, par: Parallel = Parallel(),
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, gradient all-reduce (torchrun), clipping at norm 1, AdamW and LR steps, logit-scale clamp.

    ``scaler`` (precision amp-fp16): the loss is scaled before the backward and the gradients unscaled before
    clipping; a step whose gradients overflowed is skipped by the scaler, which then lowers its scale.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        par.average_gradients(student)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        par.average_gradients(student)  # every rank unscales the same summed gradients, so all skip alike
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    with torch.no_grad():
        student.clip.logit_scale.clamp_(0, math.log(100))


# ---------------------------------------------------------------------- checkpoints


def _rng_state(device: torch.device | None = None) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _on_cpu(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) copied to the CPU: a checkpoint written on a
    GPU then loads anywhere, with or without ``map_location``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: Path, student: Student, optimizer, scheduler, state: RunState, cfg: DistillConfig,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Everything a resume needs, tensors on the CPU, written atomically (``scaler``: amp-fp16's loss scale)."""
    device = next(student.parameters()).device
    payload = {
        "config": cfg.to_dict(),
        "step": state.step,
        "position": [state.position.epoch, state.position.batch],
        "nan_skips": state.nan_skips,
        "seconds": state.seconds,
        "model": _on_cpu(student.state_dict()),
        "optimizer": _on_cpu(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(device),
        "metrics": [dict(row) for row in state.metrics],
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# Settings added after runs had been saved, with the value those runs used (not today's default): a saved
# config without one reads as that value. loss.kd_direction was "both" before it existed.
# device and precision need no entry: their defaults are what older runs did, and a saved ``amp`` reads as its
# precision (DistillConfig.__post_init__).
SETTINGS_BEFORE_THEY_EXISTED = {("loss", "kd_direction"): "both"}
# May change on resume: a longer run, other intervals, inputs found at new places (checked by content), or
# another device (checkpoints load onto any).
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "eval_every", "threads", "store", "out_dir", "shards",
                               "tokenizer", "device"})


def config_differences(saved: dict, cfg: DistillConfig, where: str,
                       ignore: frozenset[str] = RESUMABLE_CHANGES, effective: bool = False) -> list[str]:
    """Top-level ``DistillConfig`` fields in which the saved config (a ``to_dict``) and ``cfg`` differ.

    ``effective``: compare the loss as each config's mode uses it (``effective_loss``), so e.g. a contrastive
    run does not differ by kd settings it never read.

    Read back through the config loader, so a setting added since ``saved`` was written takes the value runs
    had before it existed (``SETTINGS_BEFORE_THEY_EXISTED``) or else its default. A setting removed since, or a
    value no longer valid, is a ResumeMismatchError.
    """
    saved = json.loads(json.dumps(saved))
    for (table, key), value in SETTINGS_BEFORE_THEY_EXISTED.items():
        if isinstance(saved.get(table), dict):
            saved[table].setdefault(key, value)
    try:
        saved_cfg = from_dict(DistillConfig, saved, f"{where} config")
    except ValueError as err:
        raise ResumeMismatchError(f"{err}; use another --out directory") from err
    if effective:
        saved_cfg, cfg = (replace(c, loss=c.effective_loss()) for c in (saved_cfg, cfg))
    saved, current = saved_cfg.to_dict(), cfg.to_dict()
    for key in PATH_FIELDS:  # the same files, however the paths were written (relative here, absolute there)
        saved[key], current[key] = _place(saved.get(key)), _place(current.get(key))
    return [k for k in sorted(set(saved) | set(current)) if k not in ignore and saved.get(k) != current.get(k)]


PATH_FIELDS = ("eval_shards", "store", "shards", "tokenizer")


def _place(value):
    """A local path as its real absolute path (from the working directory); anything else (None, a brace
    pattern, a URL or ``pipe:`` spec, a hub id that is no local path) unchanged."""
    if not isinstance(value, str) or any(mark in value for mark in ("{", "://", "pipe:")):
        return value
    return os.path.realpath(value) if os.path.exists(value) else value


def load_checkpoint(path: Path, student: Student, optimizer, scheduler, cfg: DistillConfig,
                    scaler: torch.amp.GradScaler | None = None) -> RunState:
    """The run state of ``path``, its weights and optimizer state loaded onto the student's device, whichever device
    wrote it (tensors are read onto the CPU first, ``map_location``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    differences = config_differences(payload["config"], cfg, str(path))
    if differences:
        raise ResumeMismatchError(f"{path} was written with a different config ({differences}); "
                                  "use another --out directory or the same settings")
    student.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    device = next(student.parameters()).device
    if "cuda" in payload["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(payload["rng"]["cuda"], device)
    if scaler is not None and "scaler" in payload:
        scaler.load_state_dict(payload["scaler"])
    step = payload["step"]
    rows = payload["metrics"] if "metrics" in payload else _rows_from_csv(path.parent / "metrics.csv", step)
    return RunState(step, Position(*payload["position"]), payload["nan_skips"], payload["seconds"], rows)


def _rows_from_csv(path: Path, step: int) -> list[dict]:
    """Rows 1..step of metrics.csv, for checkpoints written before they carried their rows."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: _number(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= step]


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------------- the loop


def _optimizer(student: Student, cfg: DistillConfig):
    return adamw_warmup_cosine(student, cfg.lr, cfg.weight_decay, cfg.steps, cfg.warmup,
                               {"clip.visual.": cfg.image_lr_scale})


class MetricsLog:
    """metrics.csv as a derived view of the rows the checkpoint holds; the checkpoint is the one source of truth.

    Two files cannot be replaced in one atomic step, so the rows travel inside checkpoint.pt
    (``RunState.metrics``) and metrics.csv is only ever rewritten from a checkpoint's rows: right after
    each checkpoint is saved, and at every start from the checkpoint it resumes (none: no file). A kill
    at any instant therefore leaves either (a) both files from the same checkpoint, or (b) a new
    checkpoint and the previous csv, a prefix of its rows; the next start rewrites the csv from the
    checkpoint, so no row is lost and none describes a step the checkpoint does not hold.
    (Writing the csv first instead would need the resume to truncate it and refill rows from
    somewhere; keeping the rows in the checkpoint removes that second path.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, rows: list[dict]) -> None:
        """Replace metrics.csv by ``rows`` (one per step); no rows removes it."""
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, buffer.getvalue().encode())


# Run directory files besides checkpoint.pt, metrics.csv, tb/, student/ and summary.json: the run's milestones
# (appended across resumes) and its training curves.
RUN_LOG, CURVES = "log.txt", "curves.png"


def distill(cfg: DistillConfig, progress: bool = True, stop_after: int | None = None,
            inputs: DistillInputs | None = None) -> dict:
    """Train (or resume) the student in ``cfg.out_dir``; returns the run summary (also written as summary.json).

    ``stop_after`` ends the process-local loop early after that many steps (for tests of resume); steps
    after the last checkpoint are then not kept, as after a kill. The main rank appends the run's milestones
    to ``log.txt`` in the run directory (``RUN_LOG``: start, resume, evals, checkpoints, the end).
    ``inputs``: ``check_inputs(cfg)`` already made by the caller (`mcad distill`), so the store is opened and its
    sources are looked up once (None: this checks them).
    """
    with (main_rank_writer_lock(cfg.out_dir, what=f"run directory {cfg.out_dir}"),  # a 2nd run on it: refused first
          RunLog(Path(cfg.out_dir) / RUN_LOG) as run_log):
        return _distill(cfg, progress, stop_after, run_log, inputs)


def _distill(cfg: DistillConfig, progress: bool, stop_after: int | None, run_log: RunLog | None = None,
             inputs: DistillInputs | None = None) -> dict:
    # A device this machine lacks, or a precision it cannot run there: named before any other work.
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # what a library allocates on "the current GPU" lands on this rank's too
    if inputs is None:
        inputs = check_inputs(cfg)  # before the run directory exists: a bad input leaves nothing behind
    cfg = replace(cfg, eval_shards=inputs.eval_shards)  # the run's config names the split it is measured on
    tokenizer_dir = inputs.tokenizer_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    par = Parallel.from_env(device)
    stream = CacheBatches(inputs.store, cfg.batch_size, cfg.student.image_size, cfg.seed,
                          fused=cfg.mode in ("fused_kd", "mcad"), policy=cfg.on_error, batching=cfg.batching,
                          neighbors=cfg.batch_neighbors, paths=inputs.paths,
                          fusion=(cfg.fusion_rule, cfg.fusion_a) if cfg.fusion_rule is not None else None,
                          rank=par.rank, world=par.world, sources=cfg.online)
    check_split(cfg.batch_size, stream.block_sizes(), par.world)  # every batch splits over the ranks
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if par.main:  # the main rank is this directory's only writer, and it has written nothing yet
        if run_log is not None:
            run_log.open()
        for stale in remove_stale_temporaries(out):
            log.warning("removed %s, left by a writer that was killed", stale)
    torch.manual_seed(cfg.seed)
    manifest = stream.manifest
    integration_dim = int(manifest["integration"]["dim"])
    student_cfg = replace(cfg.student, feature_dims=(integration_dim, integration_dim),
                          context_length=int(manifest["tokenizer"]["context_length"]))
    # Built (and seeded) on the CPU, then moved: the same initial weights on every device.
    student = build_student(student_cfg, tokenizer_dir, out / "student_build" / f"rank{par.rank}").to(device)
    par.broadcast_parameters(student)
    optimizer, scheduler = _optimizer(student, cfg)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    checkpoint = out / "checkpoint.pt"
    state = (load_checkpoint(checkpoint, student, optimizer, scheduler, cfg, scaler) if checkpoint.exists()
             else RunState())
    if par.main:
        atomic_write_json(out / "config.json", cfg.to_dict())
        _log_start(cfg, device, par.world, state.step)
    metrics = MetricsLog(out / "metrics.csv")
    if par.main:
        metrics.write(state.metrics)  # repairs a csv that a kill left behind the checkpoint
    writer = _tensorboard(out / "tb") if par.main else None
    teachers = stream.spec.teachers
    online = None
    if cfg.online:
        from mcad_student.online import OnlineTeachers

        online = OnlineTeachers.from_store(stream.store)
    student.train()
    batches = stream.iter_from(state.position)
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"distill {cfg.mode}", disable=not (progress and par.main),
               mininterval=2.0)
    steps_here = 0
    start = time.perf_counter()
    try:  # the stream reads the next block in a thread: closed however the loop ends
        while state.step < cfg.steps and (stop_after is None or steps_here < stop_after):
            position, batch = next(batches)
            state.position = position
            if len(batch["rows"]) < 2:  # a block's last batch can hold a single image: no in-batch negatives
                continue
            if online is not None:  # the teachers score the global batch; this rank keeps its target rows
                computed = online.targets(batch["source_images"], batch["boxes"], batch["captions"])
                batch = {**batch, "targets": {"ensemble": tuple(t[batch["local"]] for t in computed["ensemble"])},
                         "integrated_image": computed["integrated_image"],
                         "integrated_text": computed["integrated_text"]}
            batch = batch_to_device(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                terms = batch_terms(student, batch, cfg, teachers, par)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                state.nan_skips += 1
                log.warning("step %d: non-finite loss %s, skipped (%d so far)", state.step, loss.item(),
                            state.nan_skips)
                if state.nan_skips > cfg.max_nan_skips:
                    raise NonFiniteLossError(f"{state.nan_skips} non-finite losses (limit {cfg.max_nan_skips}) "
                                             f"by step {state.step}; lower the learning rate or check the cache")
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer_step(student, optimizer, scheduler, loss, par, scaler)
            state.step += 1
            steps_here += 1
            row = {"step": state.step, "lr": scheduler.get_last_lr()[0],
                   "candidates_in_batch": batch["candidates_in_batch"],
                   **{k: float(v.detach()) for k, v in terms.items()}}
            state.metrics.append(row)
            if writer is not None:
                for key, value in row.items():
                    if key != "step":
                        writer.add_scalar(key, value, state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            # Evaluate before checkpointing, so a checkpoint of this step holds the row with its val/ recalls.
            if par.main and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                recalls = evaluate_student(student, tokenizer_dir, cfg)
                row.update({f"val/{k}": v for k, v in recalls.items()})
                _log_eval(writer, recalls, state.step, cfg.eval_shards)
                student.train()
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                state.seconds += time.perf_counter() - start
                start = time.perf_counter()
                if par.main:
                    save_checkpoint(checkpoint, student, optimizer, scheduler, state, cfg, scaler)
                    metrics.write(state.metrics)
                    log.info("step %d: checkpoint written (loss %.4f)", state.step, row["loss"])
                par.barrier()
    finally:
        batches.close()
    bar.close()
    state.seconds += time.perf_counter() - start
    if not par.main:
        par.barrier()
        par.close()
        return {"step": state.step, "finished": state.step >= cfg.steps, "rank": par.rank}
    if state.step < cfg.steps:
        writer.close()
        log.info("stopped at step %d of %d; a re-run resumes from the last checkpoint", state.step, cfg.steps)
        par.barrier()
        par.close()
        return {"step": state.step, "finished": False}
    save_checkpoint(checkpoint, student, optimizer, scheduler, state, cfg, scaler)
    metrics.write(state.metrics)
    student.eval()
    spec = save_student(student, tokenizer_dir, out / "student")
    recalls = evaluate_student(student, tokenizer_dir, cfg)
    _log_eval(writer, recalls, state.step, cfg.eval_shards)
    writer.close()
    hits = stream.in_batch_hits
    summary = {
        "mode": cfg.mode, "seed": cfg.seed, "steps": state.step, "seconds": round(state.seconds, 2),
        "steps_per_second": round(state.step / max(state.seconds, 1e-9), 3),
        # The deployed retrieval model (the open_clip model); the fd/ia heads are a training device only.
        "parameters": sum(p.numel() for p in student.clip.parameters()),
        "head_parameters": sum(p.numel() for p in student.heads.parameters()),
        "candidates_in_batch": round(sum(hits) / len(hits), 4) if hits else None,
        "nan_skips": state.nan_skips, "skipped_samples": stream.skipped,
        "eval_shards": cfg.eval_shards, "recalls": recalls, "student": spec,
        "last_loss": state.metrics[-1]["loss"] if state.metrics else None,
    }
    atomic_write_json(out / "summary.json", summary)
    write_curves(out / "metrics.csv", out / CURVES, final=(state.step, recalls["mean_recall"]))
    log.info("finished: %d steps in %.1fs (%.3f steps/s), student saved as %s; wrote summary.json and %s",
             state.step, state.seconds, summary["steps_per_second"], spec, CURVES)
    par.barrier()
    par.close()
    return summary


# The batch tensors a step reads (besides "targets"): moved to the training device by ``batch_to_device``.
BATCH_TENSORS = ("pixels", "input_ids", "integrated_image", "integrated_text")


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor the loss reads (pixels, token ids, target logits, integrated features) on
    ``device``; to a GPU from pinned host memory with non-blocking copies. Index tensors (rows, texts, ...) stay."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == device:
            return tensor
        if device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    out = {**batch, "targets": {name: tuple(move(t) for t in pair) for name, pair in batch["targets"].items()}}
    out.update({key: move(batch[key]) for key in BATCH_TENSORS})
    return out


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter  # tensorboard is a declared dependency

    return SummaryWriter(str(path))


def _log_start(cfg: DistillConfig, device: torch.device, world: int, step: int) -> None:
    """The run log's first lines: what trains where, the whole config, and the step it resumes from."""
    log.info("distill start in %s: mode %s, %d steps, batch %d, lr %g, seed %d, student %s, device %s (%s), "
             "%d rank(s); store %s, eval shards %s", cfg.out_dir, cfg.mode, cfg.steps, cfg.batch_size, cfg.lr,
             cfg.seed, cfg.student.image_model, device, cfg.precision, world, cfg.store, cfg.eval_shards)
    log.info("config: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    if step:
        log.info("resuming from step %d of %d", step, cfg.steps)


def _log_eval(writer, recalls: dict[str, float], step: int, shards: str) -> None:
    """One evaluation's recalls: a run log line, and TensorBoard scalars ``eval/<name>`` (``writer``: None on
    ranks other than the main one, which do not evaluate)."""
    log.info("step %d: eval on %s: %s", step, shards, ", ".join(f"{k} {v:.2f}" for k, v in recalls.items()))
    if writer is not None:
        for key, value in recalls.items():
            writer.add_scalar(f"eval/{key}", value, step)
        writer.flush()


# metrics.csv columns that are not loss terms (every other column without a "/" is one: loss, itc, kd, ...).
NOT_LOSS_COLUMNS = frozenset({"step", "lr", "candidates_in_batch"})


def write_curves(metrics_csv: Path, out: Path, final: tuple[int, float] | None = None) -> None:
    """Plot ``metrics_csv`` into the PNG ``out`` (written atomically): each loss term over the steps (thin:
    every step; bold: a running mean), and beside it the eval mean recall over the steps where the csv holds
    one (``val/mean_recall``), plus ``final`` (step, mean recall) of the end-of-run evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    terms = [c for c in columns if c not in NOT_LOSS_COLUMNS and "/" not in c]
    recall = [(int(r["step"]), float(r["val/mean_recall"])) for r in rows if r.get("val/mean_recall")]
    if final is not None:
        recall.append(final)
    fig = Figure(figsize=(11 if recall else 6.5, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if recall else 1, squeeze=False)[0]
    steps = [int(r["step"]) for r in rows]
    window = max(1, len(rows) // 50)
    for i, term in enumerate(terms):
        values = [float(r[term]) if r.get(term) else math.nan for r in rows]
        colour = f"C{i}"
        axes[0].plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        axes[0].plot(steps, _running_mean(values, window), color=colour, linewidth=1.6, label=term)
    axes[0].set(xlabel="step", ylabel="loss",
                title="loss terms" + (f" (bold: mean of {window} steps)" if window > 1 else ""))
    if terms:
        axes[0].legend()
    if recall:
        axes[1].plot(*zip(*recall, strict=True), marker="o")
        axes[1].set(xlabel="step", ylabel="mean recall", title="eval mean recall")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(out, buffer.getvalue())


def _running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start), NaN (no value) left out."""
    out = []
    for i in range(len(values)):
        known = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(known) / len(known) if known else math.nan)
    return out


class StudentEncoder:
    """The student as the DualStreamEncoder that `mcad_core.evaluation` scores."""

    def __init__(self, student: Student, tokenizer_dir: str, context_length: int) -> None:
        from transformers import AutoTokenizer

        self.student = student
        self.device = next(student.parameters()).device
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.context_length = context_length
        self.image_size = student.image_size

    def pixels_from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.pixels_from_uint8(images)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.student.encode_image(pixels)

    @torch.no_grad()
    def encode_texts(self, texts) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")["input_ids"]
        return self.student.encode_text(ids.to(self.device))


def evaluate_student(student: Student, tokenizer_dir: str, cfg: DistillConfig) -> dict[str, float]:
    from mcad_core.evaluation import evaluate_dual_stream
    from mcad_core.shards import list_shards, load_split

    student.eval()
    split = load_split(list_shards(cfg.eval_shards), image_size=student.image_size, policy=cfg.on_error)
    return evaluate_dual_stream(StudentEncoder(student, tokenizer_dir, student.context_length), split)
