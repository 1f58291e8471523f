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
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mcad_cache.fusion import FUSION_RULES
from mcad_cache.sources import locate_tokenizer
from mcad_student.choices import BATCHINGS
from mcad_student.data import CacheBatches, Position
from mcad_student.losses import LossWeights, ammkd_kd_loss, fd_loss, ia_loss, itc_loss, kd_loss, total_loss
from mcad_student.model import STUDENT_PRESETS, Student, StudentConfig, build_student, save_student
from mcad_student.parallel import Parallel
from mcad_core.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
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
    # itc + kd to the fused top-k targets. Full "mcad" adds fd + ia, which at weights 1 cost 5.7 test mean
    # recall on the default world at 1000 steps (54.0 against 59.7, seed 0; docs/experiments.md) and at 0.1
    # (their default) cost 1.4 +- 0.9 in the 3-seed ablation with kd on image-to-text rows (docs/results.md).
    mode: str = "fused_kd"
    # The ViT preset: 1.01M parameters, no larger than the default world's CLIP teachers, and it trains from
    # scratch (MobileViTv2-050 from scratch reached 3.2 mean recall where this tower reached 21.5; docs/experiments.md).
    student: StudentConfig = STUDENT_PRESETS["vit"]
    loss: LossWeights = LossWeights()
    steps: int = 1500
    batch_size: int = 128
    lr: float = 5e-4
    # LR multiplier of the image tower: 1 for the ViT preset. From scratch, the mobilevit preset's narrow
    # depthwise backbone barely moves at the text tower's LR and wants 5 (docs/experiments.md, "Why the image tower gets
    # a higher LR").
    image_lr_scale: float = 1.0
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: only at the end
    eval_shards: str = "data/default/val"
    max_nan_skips: int = 20
    amp: bool = False  # bf16 autocast; on CUDA it pays, on CPU it is usually slower
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

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    def effective_loss(self) -> LossWeights:
        """The loss weights this mode actually uses (terms a mode does not have are zeroed, settings only they
        read are at their defaults)."""
        return self.loss.used_by(MODE_TERMS[self.mode])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DistillConfigError(message)


def check_inputs(cfg: DistillConfig) -> tuple[dict[str, str], str]:
    """Fail in seconds, and before the run directory exists, when an input the run needs is missing.

    Without this a missing --eval-shards surfaced only after training, at the final evaluation. Every
    run that finishes evaluates, so the shards are checked always. The store's own source shards are
    found and checked against their fingerprints, and its tokenizer against its hash, so data changed or
    moved since `mcad cache` is named here, not part-way through training. Raises FileNotFoundError (a
    ``NoShardsError`` or ``SourceShardsError``) or ``TokenizerMismatchError``; creates nothing.
    Returns what it found, (source shard paths by name, tokenizer directory), so nothing is looked up twice.
    """
    from mcad_cache.sources import locate_shards
    from mcad_cache.store import CacheStore
    from mcad_core.shards import list_shards

    store = CacheStore.open(cfg.store)  # "no cache store at ... (run `mcad cache` first)" when absent
    paths = locate_shards(store.manifest, store.path, cfg.shards)  # missing or changed shards: SourceShardsError
    tokenizer_dir = locate_tokenizer(store.manifest, store.path, cfg.tokenizer)
    list_shards(cfg.eval_shards)
    return paths, tokenizer_dir


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
                             v.weights.kd_direction)
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
    """Every loss term of one global batch; under torchrun this rank encodes only its rows (see parallel.py)."""
    weights = cfg.effective_loss()
    n = len(batch["rows"])
    mine = par.local_rows(n)
    local = student(student.pixels_from_uint8(batch["pixels"][mine]), batch["input_ids"][mine])
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


def optimizer_step(student: Student, optimizer, scheduler, loss: torch.Tensor, par: Parallel = Parallel()) -> None:
    """Backward, gradient all-reduce (torchrun), clipping at norm 1, AdamW and LR steps, logit-scale clamp."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    par.average_gradients(student)
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        student.clip.logit_scale.clamp_(0, math.log(100))


# ---------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def save_checkpoint(path: Path, student: Student, optimizer, scheduler, state: RunState, cfg: DistillConfig) -> None:
    payload = {
        "config": cfg.to_dict(),
        "step": state.step,
        "position": [state.position.epoch, state.position.batch],
        "nan_skips": state.nan_skips,
        "seconds": state.seconds,
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "metrics": [dict(row) for row in state.metrics],
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# Settings added after runs had been saved, with the value those runs used (not today's default): a saved
# config without one reads as that value. loss.kd_direction was "both" before it existed.
SETTINGS_BEFORE_THEY_EXISTED = {("loss", "kd_direction"): "both"}
# May change on resume: a longer run, other intervals, or inputs found at new places (checked by content).
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "eval_every", "threads", "store", "out_dir", "shards",
                               "tokenizer"})


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
    return [k for k in sorted(set(saved) | set(current)) if k not in ignore and saved.get(k) != current.get(k)]


def load_checkpoint(path: Path, student: Student, optimizer, scheduler, cfg: DistillConfig) -> RunState:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    differences = config_differences(payload["config"], cfg, str(path))
    if differences:
        raise ResumeMismatchError(f"{path} was written with a different config ({differences}); "
                                  "use another --out directory or the same settings")
    student.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
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


def distill(cfg: DistillConfig, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) the student in ``cfg.out_dir``; returns the run summary (also written as summary.json).

    ``stop_after`` ends the process-local loop early after that many steps (for tests of resume); steps
    after the last checkpoint are then not kept, as after a kill.
    """
    paths, tokenizer_dir = check_inputs(cfg)  # before the run directory exists: a bad input leaves nothing behind
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    par = Parallel.from_env()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if par.main:  # the main rank is this directory's only writer, and it has written nothing yet
        for stale in remove_stale_temporaries(out):
            log.warning("removed %s, left by a writer that was killed", stale)
    torch.manual_seed(cfg.seed)
    stream = CacheBatches(cfg.store, cfg.batch_size, cfg.student.image_size, cfg.seed,
                          fused=cfg.mode in ("fused_kd", "mcad"), policy=cfg.on_error, batching=cfg.batching,
                          paths=paths,
                          fusion=(cfg.fusion_rule, cfg.fusion_a) if cfg.fusion_rule is not None else None)
    manifest = stream.manifest
    integration_dim = int(manifest["integration"]["dim"])
    student_cfg = replace(cfg.student, feature_dims=(integration_dim, integration_dim),
                          context_length=int(manifest["tokenizer"]["context_length"]))
    student = build_student(student_cfg, tokenizer_dir, out / "student_build" / f"rank{par.rank}")
    par.broadcast_parameters(student)
    optimizer, scheduler = _optimizer(student, cfg)
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint, student, optimizer, scheduler, cfg) if checkpoint.exists() else RunState()
    if par.main:
        atomic_write_json(out / "config.json", cfg.to_dict())
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
    while state.step < cfg.steps and (stop_after is None or steps_here < stop_after):
        position, batch = next(batches)
        state.position = position
        if len(batch["rows"]) < 2:  # a block's last batch can hold a single image: no in-batch negatives
            continue
        if online is not None:
            computed = online.targets(batch["source_images"], batch["boxes"], batch["captions"])
            batch = {**batch, "targets": {"ensemble": computed["ensemble"]},
                     "integrated_image": computed["integrated_image"], "integrated_text": computed["integrated_text"]}
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=cfg.amp):
            terms = batch_terms(student, batch, cfg, teachers, par)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            state.nan_skips += 1
            log.warning("step %d: non-finite loss %s, skipped (%d so far)", state.step, loss.item(), state.nan_skips)
            if state.nan_skips > cfg.max_nan_skips:
                raise NonFiniteLossError(f"{state.nan_skips} non-finite losses (limit {cfg.max_nan_skips}) "
                                         f"by step {state.step}; lower the learning rate or check the cache")
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer_step(student, optimizer, scheduler, loss, par)
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
            student.train()
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            state.seconds += time.perf_counter() - start
            start = time.perf_counter()
            if par.main:
                save_checkpoint(checkpoint, student, optimizer, scheduler, state, cfg)
                metrics.write(state.metrics)
            par.barrier()
    bar.close()
    state.seconds += time.perf_counter() - start
    if writer is not None:
        writer.close()
    if not par.main:
        par.barrier()
        par.close()
        return {"step": state.step, "finished": state.step >= cfg.steps, "rank": par.rank}
    if state.step < cfg.steps:
        par.barrier()
        par.close()
        return {"step": state.step, "finished": False}
    save_checkpoint(checkpoint, student, optimizer, scheduler, state, cfg)
    metrics.write(state.metrics)
    student.eval()
    spec = save_student(student, tokenizer_dir, out / "student")
    recalls = evaluate_student(student, tokenizer_dir, cfg)
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
    par.barrier()
    par.close()
    return summary


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter  # tensorboard is a declared dependency

    return SummaryWriter(str(path))


class StudentEncoder:
    """The student as the DualStreamEncoder that `mcad_core.evaluation` scores."""

    def __init__(self, student: Student, tokenizer_dir: str, context_length: int) -> None:
        from transformers import AutoTokenizer

        self.student = student
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
        return self.student.encode_text(ids)


def evaluate_student(student: Student, tokenizer_dir: str, cfg: DistillConfig) -> dict[str, float]:
    from mcad_core.evaluation import evaluate_dual_stream
    from mcad_core.shards import list_shards, load_split

    student.eval()
    split = load_split(list_shards(cfg.eval_shards), image_size=student.image_size, policy=cfg.on_error)
    return evaluate_dual_stream(StudentEncoder(student, tokenizer_dir, student.context_length), split)
