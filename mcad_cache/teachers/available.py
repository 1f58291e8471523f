"""Preflight: can every teacher (and the student tokenizer) be loaded here, before any work starts?

A model is loadable when it is a local directory, when its files are in the local Hugging Face
hub cache (``HF_HUB_CACHE`` / ``HF_HOME``; open_clip's url downloads in ``~/.cache/clip``), or
when the hub can be reached to download them. ``check_models`` decides which in about a second,
reading no weights: it looks each model's files up in the cache (no network) and, only when a
model is not local, asks whether the machine is offline (``HF_HUB_OFFLINE`` set, or the hub
endpoint not answering a HEAD within ``PROBE_SECONDS``). A model that cannot be loaded is a
``TeacherUnavailableError`` (exit 3) naming it and the fix, raised before a shard is read or a
store is made; a machine that is offline but holds every file loads them with the hub in offline
mode (``hub_access``), so the hub client never retries a request.

The loaders (``DualStreamTeacher.load``, ``BlipItmTeacher.load``) run the same check for their own
model, so every caller gets the named error; ``mcad cache`` and ``mcad eval`` run it for all of
their models first, so nothing is loaded when one of them is missing.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mcad_core.errors import InputError

PROBE_SECONDS = 3.0  # how long the hub endpoint may take to answer before the machine counts as offline
PROBE_MEMORY_SECONDS = 300.0  # a probe's answer is reused this long (one per command, not one per teacher)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_DEFAULT_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's HF_WEIGHTS_NAME
OPEN_CLIP_LOCAL_WEIGHTS = ("*.safetensors", "*.bin", "*.pth")  # what open_clip's local-dir loader looks for
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
              "pytorch_model.bin.index.json")
HF_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")
HF_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the hub's, and what transformers 5 saves
_TRUE = {"1", "ON", "YES", "TRUE"}


class TeacherUnavailableError(InputError):
    """A teacher (or the student tokenizer) cannot be loaded on this machine; the message says which and how to fix it."""

    def __init__(self, message: str, missing: list[Model]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Model:
    """What loading one named model needs, as far as can be told without loading it.

    ``problem``: it cannot load whatever the network (a local path that is not there, an unknown
    open_clip tag). ``missing``: hub files (``repo/file``) that are not in the local cache, and
    ``repos`` the hub repositories that hold them: loadable online, not offline.
    """

    role: str  # "dual-stream teacher", "single-stream teacher", "student tokenizer"
    name: str  # as the user wrote it
    local: bool  # nothing of it comes from the hub
    problem: str | None = None
    missing: tuple[str, ...] = ()
    repos: tuple[str, ...] = ()
    fix: str = ""  # how to point at a local copy instead

    @property
    def label(self) -> str:
        return f"{self.role} {self.name}"


@dataclass
class _Probe:
    reason: str | None  # None: online
    at: float = field(default_factory=time.monotonic)


_probes: dict[str, _Probe] = {}  # hub endpoint -> its last probe


# ------------------------------------------------------------------------- where things are


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in _TRUE


def hub_cache_dir() -> Path:
    """The hub cache the Hugging Face clients use, from the environment as it is now."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expanduser(os.environ[name]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def open_clip_url_cache() -> Path:
    """Where open_clip keeps weights it downloads from a url (its ``download_pretrained_from_url`` default)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache_dir()))
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def _repo_cached(repo: str) -> bool:
    """Whether any snapshot of ``repo`` is in the cache (for repos whose exact files the loader picks itself)."""
    snapshots = hub_cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ------------------------------------------------------------------------- what each model needs


def dual_model(spec) -> Model:
    """What an open_clip teacher (``DualTeacherSpec``: ``name`` and optional ``pretrained``) needs."""
    label = spec.name if not spec.pretrained else f"{spec.name}:{spec.pretrained}"
    role = "dual-stream teacher"
    fix = ("save it with open_clip's layout (open_clip_config.json + weights) and pass `local-dir:PATH` "
           "(mcad_cache.teachers.dual.save_local writes that layout)")
    if spec.name.startswith("local-dir:"):
        path = Path(spec.name.removeprefix("local-dir:"))  # as open_clip reads it: no ~ expansion
        problem = None
        if not path.is_dir():
            problem = f"no directory at {path}" if not path.exists() else f"{path} is not a directory"
        elif not (path / OPEN_CLIP_CONFIG).is_file():
            problem = f"{path} has no {OPEN_CLIP_CONFIG}: not an open_clip model directory"
        elif not any(any(path.glob(pattern)) for pattern in OPEN_CLIP_LOCAL_WEIGHTS):
            problem = (f"{path} has no weights file (*.safetensors, *.bin or *.pth): open_clip would load "
                       "random weights")
        return Model(role, label, True, problem, fix=fix)
    if spec.name.startswith("hf-hub:"):
        repo = spec.name.removeprefix("hf-hub:")
        if not _valid_repo_id(repo):
            return Model(role, label, False, f"{repo!r} is not a Hugging Face repo id (ORG/NAME)", fix=fix)
        missing = _missing_files(repo, [(OPEN_CLIP_CONFIG,), _weights_and_alternatives(OPEN_CLIP_DEFAULT_WEIGHTS)])
        repos = [repo] if missing else []
        config = _cached_json(repo, OPEN_CLIP_CONFIG)
        extra = _hf_text_repos(config.get("model_cfg", config) if config else {})
        missing += [f"{r} (text tower / tokenizer)" for r in extra if not _repo_cached(r)]
        repos += [r for r in extra if not _repo_cached(r)]
        return Model(role, label, False, None, tuple(missing), tuple(repos), fix)
    return _builtin_dual_model(spec, label, role, fix)


def _builtin_dual_model(spec, label: str, role: str, fix: str) -> Model:
    """A built-in open_clip architecture, with a pretrained tag (hub file or url) or a weights file."""
    import open_clip
    from open_clip import pretrained as registry

    name = spec.name.replace("/", "-")  # how open_clip's create_model cleans a built-in name
    if name not in open_clip.list_models():
        return Model(role, label, True, f"open_clip has no model {spec.name!r} (see open_clip.list_models())", fix=fix)
    model_cfg = open_clip.get_model_config(name) or {}
    missing: list[str] = []
    repos: list[str] = []
    local = True
    tag = spec.pretrained
    if tag:
        cfg = registry.get_pretrained_cfg(name, tag)
        if not cfg:
            if os.path.isfile(tag):
                pass  # a weights file on disk
            else:
                known = ", ".join(registry.list_pretrained_tags_by_model(name)) or "none"
                problem = f"{tag!r} is neither a pretrained tag of {name} (known: {known}) nor a weights file"
                return Model(role, label, True, problem, fix=fix)
        elif cfg.get("file"):
            if not os.path.isfile(cfg["file"]):
                return Model(role, label, True, f"the weights file {cfg['file']} is not there", fix=fix)
        elif cfg.get("hf_hub") and registry.has_hf_hub():
            local = False
            repo, filename = os.path.split(cfg["hf_hub"])  # as open_clip's download_pretrained splits it
            missing += _missing_files(repo, [_weights_and_alternatives(filename or OPEN_CLIP_DEFAULT_WEIGHTS)])
            repos += [repo] if missing else []
        elif cfg.get("url"):
            local = False
            target = open_clip_url_cache() / os.path.basename(cfg["url"])
            if not target.is_file():
                missing.append(f"{cfg['url']} (open_clip's url cache {open_clip_url_cache()})")
    extra = [r for r in _hf_text_repos(model_cfg) if not _repo_cached(r)]
    local = local and not _hf_text_repos(model_cfg)
    missing += [f"{r} (text tower / tokenizer)" for r in extra]
    repos += extra
    return Model(role, label, local, None, tuple(missing), tuple(repos), fix)


def single_model(spec) -> Model:
    """What a single-stream teacher (``SingleTeacherSpec``: ``name`` and ``kind``) needs.

    The built-in ``blip`` kind reads a ``save_pretrained`` directory or a hub repo; other kinds
    load in their own way, so only a name that is a local path is checked for them.
    """
    role = "single-stream teacher"
    label = str(spec)
    fix = "pass a directory that holds it (save_pretrained of the model and its processor)"
    path = Path(spec.name)
    if path.exists():
        if not path.is_dir():
            return Model(role, label, True, f"{path} is not a directory", fix=fix)
        if spec.kind == "blip" and not (path / "config.json").is_file():
            return Model(role, label, True, f"{path} has no config.json: not a save_pretrained directory", fix=fix)
        return Model(role, label, True, fix=fix)
    if spec.kind != "blip":
        return Model(role, label, True, fix=fix)  # the kind's loader names its own inputs
    if not _valid_repo_id(spec.name):
        return Model(role, label, True, f"no directory at {path} (and not a hub repo id)", fix=fix)
    missing = _missing_files(spec.name, [("config.json",), HF_WEIGHTS, HF_PROCESSOR_FILES, HF_TOKENIZER_FILES])
    return Model(role, label, False, None, tuple(missing), (spec.name,) if missing else (), fix)


def tokenizer_model(name: str) -> Model:
    """The student tokenizer of ``mcad cache`` (``--tokenizer``): a directory or a hub repo."""
    role = "student tokenizer"
    fix = "pass the directory that holds it (--tokenizer DIR)"
    path = Path(name)
    if path.exists():
        problem = None if path.is_dir() else f"{path} is not a directory"
        return Model(role, name, True, problem, fix=fix)
    if not _valid_repo_id(name):
        return Model(role, name, True, f"no directory at {path} (and not a hub repo id)", fix=fix)
    missing = _missing_files(name, [HF_TOKENIZER_FILES])
    return Model(role, name, False, None, tuple(missing), (name,) if missing else (), fix)


def _weights_and_alternatives(filename: str) -> tuple[str, ...]:
    """``filename`` and the safetensors files open_clip tries first (its ``_get_safe_alternatives``)."""
    if filename == OPEN_CLIP_DEFAULT_WEIGHTS:
        return ("open_clip_model.safetensors", filename)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def _missing_files(repo: str, needs: Iterable[tuple[str, ...]]) -> list[str]:
    """``repo/file`` for each need (any one of its alternative files, named by the first) not in the cache."""
    return [f"{repo}/{options[0]}" for options in needs if not any(_cached(repo, option) for option in options)]


def _cached_json(repo: str, filename: str) -> dict | None:
    import json

    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache_dir()))
    if not isinstance(found, str):
        return None
    try:
        return json.loads(Path(found).read_text())
    except (OSError, ValueError):
        return None


def _hf_text_repos(model_cfg: dict) -> list[str]:
    """Hub repos an open_clip config's text tower or tokenizer is built from (``hf_model_name`` / ``hf_tokenizer_name``)."""
    text = model_cfg.get("text_cfg", {}) if isinstance(model_cfg, dict) else {}
    names = [text.get("hf_model_name"), text.get("hf_tokenizer_name")]
    return sorted({n for n in names if isinstance(n, str) and n and not Path(n).exists() and _valid_repo_id(n)})


# ------------------------------------------------------------------------- offline or not


def offline_reason() -> str | None:
    """Why the hub cannot be used now (``HF_HUB_OFFLINE`` set, or the endpoint not answering), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _is_true(os.environ.get(name)):
            return f"{name} is set"
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()
    known = _probes.get(endpoint)
    if known is None or time.monotonic() - known.at > PROBE_MEMORY_SECONDS:
        known = _probes[endpoint] = _Probe(_probe(endpoint, PROBE_SECONDS))
    return known.reason


def _probe(endpoint: str, seconds: float) -> str | None:
    """None if ``endpoint`` answers a HEAD within ``seconds`` (any HTTP status), else why not.

    Run in a thread joined with the time limit, because a name lookup is not bound by a socket timeout.
    urllib honours the proxy environment variables, as the hub client does. A TLS failure counts as an
    answer: something is there, and the hub client's own certificates may well be accepted.
    """
    answer: dict[str, str | None] = {}

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=seconds).close()
            answer["reason"] = None
        except urllib.error.HTTPError:
            answer["reason"] = None  # it answered
        except urllib.error.URLError as err:
            reached = isinstance(err.reason, ssl.SSLError)
            answer["reason"] = None if reached else f"{endpoint} cannot be reached ({err.reason})"
        except (OSError, ValueError) as err:
            detail = getattr(err, "reason", None) or err
            answer["reason"] = f"{endpoint} cannot be reached ({detail})"

    thread = threading.Thread(target=ask, name="mcad-hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return answer["reason"] if "reason" in answer else f"{endpoint} did not answer within {seconds:g} s"


def forget_probes() -> None:
    """Drop remembered probe answers (tests; a long-lived process whose network changed)."""
    _probes.clear()


@contextlib.contextmanager
def hub_access(offline: bool) -> Iterator[None]:
    """Inside: the hub clients run in offline mode if ``offline`` (files come from the cache, no request is made).

    Sets ``HF_HUB_OFFLINE`` and the flag huggingface_hub read from it at import, and restores both.
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


# ------------------------------------------------------------------------- the check


def check_models(models: Iterable[Model]) -> bool:
    """Raise ``TeacherUnavailableError`` naming every model that cannot be loaded here; else whether to load offline.

    Returns True when some model comes from the hub cache and the machine is offline: load
    those models inside ``hub_access(True)``. The network is asked only when a model is not local.
    """
    models = list(models)
    problems = [m for m in models if m.problem]
    offline = offline_reason() if any(not m.local and not m.problem for m in models) else None
    unavailable = [m for m in models if not m.problem and m.missing] if offline else []
    if problems or unavailable:
        raise TeacherUnavailableError(_message(problems, unavailable, offline), problems + unavailable)
    return offline is not None


def check_teachers(duals: Iterable = (), singles: Iterable = (), tokenizer: str | None = None) -> bool:
    """``check_models`` for dual-stream specs, single-stream specs and (optionally) the student tokenizer."""
    models = [*map(dual_model, duals), *map(single_model, singles)]
    if tokenizer is not None:
        models.append(tokenizer_model(str(tokenizer)))
    return check_models(models)


def _message(problems: list[Model], unavailable: list[Model], offline: str | None) -> str:
    count = len(problems) + len(unavailable)
    lines = [f"{count} model(s) cannot be loaded on this machine:"]
    for model in problems:
        lines.append(f"  - {model.label}: {model.problem}; {model.fix}")
    if unavailable:
        cache = hub_cache_dir()
        for model in unavailable:
            lines.append(f"  - {model.label}: neither a local directory nor in the local Hugging Face cache "
                         f"({cache}) or open_clip cache (missing {', '.join(model.missing)})")
        repos = sorted({repo for model in unavailable for repo in model.repos})
        hf = " && ".join(f"hf download {repo}" for repo in repos)
        cli = " && ".join(f"huggingface-cli download {repo}" for repo in repos)
        lines.append(f"This machine is offline ({offline}), so they cannot be downloaded. To fix: download them on a "
                     f"machine with network access (`{hf}`, or with an older huggingface_hub `{cli}`), or run this "
                     "command there once, and copy its Hugging Face hub cache (by default ~/.cache/huggingface/hub) "
                     f"to {cache} here; or point at local copies: a dual-stream teacher as "
                     "`--dual local-dir:PATH` (open_clip_config.json + weights), a single-stream (BLIP) teacher or "
                     "a tokenizer as a directory (`--single DIR`, `--tokenizer DIR`).")
    return "\n".join(lines)
