"""Typed configuration, one dataclass per job. The CLI fills these; the library reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TowerShape:
    """Width and depth of a small transformer tower pair (image and text alike)."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    embed_dim: int = 128
    patch_size: int = 8


@dataclass(frozen=True)
class Schedule:
    """One teacher's optimisation schedule: AdamW, linear warmup, cosine decay."""

    steps: int
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.05


TEACHERS = ("clip_a", "clip_b", "blip")  # what `mcad teachers` trains, in order


@dataclass(frozen=True)
class TeachersConfig:
    """`mcad teachers`: train the default world's teachers and save them in hub layouts."""

    data_dir: Path = Path("data/default")
    out_dir: Path = Path("artifacts/teachers")
    seed: int = 0
    vocab_size: int = 512
    context_length: int = 24
    # Training images are resized to this square size; None: the most common size among the split's first
    # samples (img2dataset shards written with resize_mode=no or keep_ratio mix sizes).
    image_size: int | None = None
    clip_a: TowerShape = TowerShape(width=128, layers=4, heads=4, embed_dim=128)
    clip_b: TowerShape = TowerShape(width=64, layers=4, heads=4, embed_dim=64)
    blip: TowerShape = TowerShape(width=128, layers=4, heads=4, embed_dim=128)
    clip_schedule: Schedule = Schedule(steps=400)
    blip_schedule: Schedule = Schedule(steps=320)
    # The BLIP recipe (README, "Teachers on the default world"). Share of words the image-conditioned MLM masks
    # (ALBEF's third loss; 0: off). From scratch it is what got ITM off the constant guess; on the locked, trained
    # clip_a tower ITM learns without it, and dropping it gave a better and 15 % cheaper BLIP (README).
    blip_mask_prob: float = 0.0
    blip_mined_negatives: int = 1  # ITM negatives per image and per text drawn from the ITC softmax (ALBEF)
    blip_uniform_share: float = 0.5  # share of a uniform draw mixed into the mined negatives' distribution
    blip_random_negatives: int = 0  # uniform ITM negatives per image and per text besides the mined ones
    # One rule-made negative caption per image for ITM: an attribute replaced or swapped, or the relation
    # flipped (mcad_cache/teachers/negatives.py; the words are the default world's, pipeline/synth.py).
    blip_edit_negatives: bool = True
    blip_listwise: bool = True  # add a softmax ITM term over each query's group (its true pair and negatives)
    # Start BLIP's image tower from this trained CLIP's (same shape), as METER / BLIP-2 start from CLIP; "": scratch.
    blip_vision_init: str = "clip_a"
    # Lock that image tower (LiT): its tokens are computed once and only the text/cross-attention side trains.
    blip_freeze_vision: bool = True
    clip_ln_pre: bool = False  # open_clip's pre-block LayerNorm; BLIP's ViT has none, so a locked copy needs it off
    # Text-to-image ITM negatives per text drawn from its ITC top 16 over the whole split (needs the locked tower).
    blip_split_negatives: int = 0
    only: tuple[str, ...] = ()  # retrain just these of clip_a, clip_b, blip; keep the rest (and the tokenizer)
    threads: int = 2
    # Threads that each encode a slice of every CLIP training batch with one intra-op thread
    # (mcad_cache/teachers/parallel.py); 1: one graph per step on `threads` intra-op threads.
    clip_workers: int = 2
    on_error: str = "raise"  # shard error policy: "warn" skips and counts, "raise" stops

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class EvalConfig:
    """`mcad eval`: recall@K of dual-stream models and of the single-stream re-ranker."""

    shards: str = "data/default/test"
    ks: tuple[int, ...] = (1, 5, 10)
    rerank_k: int = 16
    batch_size: int = 256
    out_json: Path | None = None
    on_error: str = "raise"


@dataclass(frozen=True)
class CacheConfig:
    """`mcad cache`: run the teachers once over ``shards`` and write the Zarr store ``store``.

    Teachers come from ``teachers_dir`` (what `mcad teachers` wrote) or are named
    explicitly: ``dual`` as open_clip specs ("ViT-B-16:openai", "local-dir:PATH",
    "hf-hub:ORG/REPO"), ``single`` as a BLIP ITM hub id or directory, and
    ``tokenizer`` (the student's, used for the stored caption tokens).
    """

    shards: str = "data/default/train"
    store: Path = Path("artifacts/cache/default.zarr")
    teachers_dir: Path | None = Path("artifacts/teachers")
    dual: tuple[str, ...] = ()
    single: str | None = None
    tokenizer: str | None = None
    context_length: int = 24  # caption tokens stored for the student
    # Images are resized to this square size before views are cut (None: the largest teacher input size,
    # so no teacher sees an image shrunk below its own input and scaled back up).
    source_size: int | None = None
    views: int = 1
    view_scale: tuple[float, float] = (0.6, 1.0)
    seed: int = 0
    k: int = 11
    block_shards: int = 4  # shards per candidate-search block (stage 2 shuffles within a block)
    dual_weights: tuple[float, ...] = ()  # per dual teacher; empty = equal weights summing to 1
    # The ITM logit added to the candidates' dual logit (BLIP's own ITM + ITC ranking). The paper's
    # reconstruction, a * dual + (1 - a) * ITM, mixes logits of different scales: the candidates' dual logits
    # are ~14.6 and their ITM logits ~0, so a=0.5 halves every candidate below the pairs outside the list
    # (README, stage 2: the fused targets' in-batch top-1 drops from 22.5 % to 19.4 %; itm_topk lifts it to 24.8 %).
    fusion_rule: str = "itm_topk"
    fusion_a: float = 1.0
    batch_size: int = 256
    itm_batch_size: int = 512
    integration_dim: int = 128
    integration_steps: int = 300
    on_error: str = "warn"  # bad samples are skipped, counted and recorded in the manifest
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: str = "auto"  # "auto": cuda:$LOCAL_RANK when CUDA is available, else cpu

    def __post_init__(self) -> None:
        """Every check that needs no data, so a typo fails before a teacher loads or a store is created."""
        positive = {"k": self.k, "views": self.views, "block_shards": self.block_shards,
                    "batch_size": self.batch_size, "itm_batch_size": self.itm_batch_size,
                    "integration_dim": self.integration_dim, "context_length": self.context_length,
                    "source_size": self.source_size}
        bad = [f"{name} must be >= 1, got {value}" for name, value in positive.items()
               if value is not None and value < 1]
        if self.integration_steps < 0:
            bad.append(f"integration_steps must be >= 0, got {self.integration_steps}")
        if self.threads < 0:
            bad.append(f"threads must be >= 0, got {self.threads}")
        low, high = self.view_scale
        if not 0.0 < low <= high <= 1.0:
            bad.append(f"view_scale must satisfy 0 < low <= high <= 1, got {tuple(self.view_scale)}")
        if any(w < 0 for w in self.dual_weights) or (self.dual_weights and not sum(self.dual_weights) > 0):
            bad.append(f"dual_weights must be >= 0 with a positive sum, got {tuple(self.dual_weights)}")
        if self.on_error not in ("warn", "raise"):
            bad.append(f"on_error must be 'warn' or 'raise', got {self.on_error!r}")
        if bad:
            raise ValueError("; ".join(bad))

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def load_config_file(path: str | Path, cls):
    """A dataclass config from a JSON or TOML file; unknown keys are an error that names them.

    Nested dataclass fields (e.g. ``student``, ``loss``) are given as tables/objects.
    """
    import json
    import tomllib

    path = Path(path)
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    return from_dict(cls, raw, str(path))


def from_dict(cls, raw: dict, where: str = "config"):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        origins = typing.get_args(hint) or (hint,)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif Path in origins and value is not None:
            value = Path(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
