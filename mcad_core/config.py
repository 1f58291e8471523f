"""Configuration plumbing every layer shares: config files into typed dataclasses, and `mcad eval`'s config.

Each stage keeps its own config dataclass beside its code (``mcad_cache.config.CacheConfig``,
``mcad_student.train.DistillConfig``, ``mcad_world.config.TeachersConfig``); this module only
reads them from JSON/TOML files and turns them back into JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EvalConfig:
    """`mcad eval`: recall@K of dual-stream models and of the single-stream re-ranker."""

    shards: str = "data/default/test"
    ks: tuple[int, ...] = (1, 5, 10)
    rerank_k: int = 16
    batch_size: int = 256
    out_json: Path | None = None
    on_error: str = "raise"


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


def from_dict(cls, raw: dict, where: str = "config", base=None):
    """``cls`` from ``raw``; a nested table overrides the fields of the enclosing default, not of its class.

    So ``[student]`` with one key changes that key of ``DistillConfig``'s default student (the ``vit``
    preset), and ``[blip.schedule]`` without ``steps`` keeps the recipe's default step count.
    ``base``: the instance whose unlisted fields are kept (None: the class's defaults).
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} keys {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        origins = typing.get_args(hint) or (hint,)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            inner = getattr(base, name) if base is not None else _default(fields[name])
            value = from_dict(hint, value, f"{where}.{name}", inner)
        elif Path in origins and value is not None:
            value = Path(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as err:  # a required field missing: a config error, not a crash
        raise ValueError(f"{where}: {err}") from err


def _default(field):
    import dataclasses

    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def jsonable(obj):
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
