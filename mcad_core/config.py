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
    Each value is checked against its field's type hint (``typed_value``): a wrong type is a ValueError
    that names the file, the field and the type, never a TypeError from deep inside a run.
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
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            inner = getattr(base, name) if base is not None else _default(fields[name])
            values[name] = from_dict(hint, value, f"{where}.{name}", inner)
            continue
        try:
            values[name] = typed_value(hint, value)
        except _WrongType:
            raise ValueError(f"{where}: field `{name}` of {cls.__name__} must be {type_name(hint)}, "
                             f"got {value!r}") from None
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as err:  # a required field missing: a config error, not a crash
        raise ValueError(f"{where}: {err}") from err


class _WrongType(Exception):
    """A config value that does not fit its field's type hint (``from_dict`` names the field)."""


def typed_value(hint, value):
    """``value`` as a field hinted ``hint`` holds it, or ``_WrongType``.

    int (not bool), float (an int is taken), str, bool, Path (from a string), ``X | None``, tuples
    (from lists: ``tuple[int, ...]`` or fixed ``tuple[float, float]``) and nested dataclasses (from
    tables). A hint it does not know takes the value as it is.
    """
    import dataclasses
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return typed_value(option, value)
            except _WrongType:
                continue
        raise _WrongType
    if hint is type(None):
        if value is None:
            return None
        raise _WrongType
    if hint is bool or hint is int or hint is str:
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise _WrongType
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _WrongType
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise _WrongType
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _WrongType
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(typed_value(args[0], v) for v in value)
        if args and len(value) != len(args):
            raise _WrongType
        return tuple(typed_value(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise _WrongType  # a table is read by from_dict; anything else is no config of this kind
    return tuple(value) if isinstance(value, list) else value


def type_name(hint) -> str:
    """How a config error names a type hint: ``int``, ``float``, ``a list of 2 float``, ``str or null``, ..."""
    import dataclasses
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if hint is Path:
        return "a path (string)"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} {' '.join(sorted({type_name(a) for a in args}))}" if args else "a list"
    if dataclasses.is_dataclass(hint):
        return f"a table of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


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
