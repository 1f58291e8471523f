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


@dataclass(frozen=True)
class TeachersConfig:
    """`mcad teachers`: train the default world's teachers and save them in hub layouts."""

    data_dir: Path = Path("data/default")
    out_dir: Path = Path("artifacts/teachers")
    seed: int = 0
    vocab_size: int = 512
    context_length: int = 24
    clip_a: TowerShape = TowerShape(width=128, layers=4, heads=4, embed_dim=128)
    clip_b: TowerShape = TowerShape(width=96, layers=4, heads=4, embed_dim=96)
    blip: TowerShape = TowerShape(width=128, layers=4, heads=4, embed_dim=128)
    clip_schedule: Schedule = Schedule(steps=500)
    blip_schedule: Schedule = Schedule(steps=400)
    threads: int = 2
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


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
