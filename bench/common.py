"""What every benchmark part shares: inputs and their checks, timing, fits, atomic result files, figures."""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mcad_core.atomic import atomic_write_bytes

DEFAULT_STORE = Path("artifacts/cache/default.zarr")
DEFAULT_SHARDS = Path("data/default/train")
DEFAULT_OUT = Path("bench/results")


def shard_metas(shard_dir: Path) -> list[dict]:
    """Every sample's json from the ``*.tar`` shards of ``shard_dir``, in shard order (the diagnostics read scenes)."""
    import json
    import tarfile

    metas = []
    for shard in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def caption_meaning(scene: dict, with_size: bool) -> tuple:
    """What a default-world caption of ``scene`` says, the same whichever object it names first.

    Captions name both objects' colour and shape (and their sizes when ``with_size``) and their relation.
    """
    from mcad_world.synth import INVERSE

    a, b = scene["objects"]

    def noun(obj: dict) -> tuple:
        return (obj["size"] if with_size else "", obj["colour"], obj["shape"])

    return min((noun(a), scene["relation"], noun(b)), (noun(b), INVERSE[scene["relation"]], noun(a)))


class MissingInputError(SystemExit):
    """A prerequisite (store, shards) is absent: exits with a message saying what to run first."""


@dataclass(frozen=True)
class Inputs:
    """Where a part reads from and writes to, and whether it runs at tiny sizes."""

    store: Path = DEFAULT_STORE
    shards: Path = DEFAULT_SHARDS
    out: Path = DEFAULT_OUT
    quick: bool = False
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (all cores), as `mcad distill` does


@dataclass(frozen=True)
class Figure:
    """One measured figure with its target, for bench/results/summary.md."""

    part: str
    name: str
    value: float | None
    unit: str
    target: str  # e.g. ">= 0.9"; "" for a figure reported without a target
    met: bool | None  # None: no target, or not measured

    def to_dict(self) -> dict:
        return asdict(self)


def check_inputs(inputs: Inputs, need_shards: bool = True) -> None:
    """Fail with a clear message when the store (or the training shards) are missing."""
    hint = "run `make data teachers cache` first (or pass --store/--shards)"
    if not (Path(inputs.store) / "zarr.json").exists():
        raise MissingInputError(f"bench: no cache store at {inputs.store}: {hint}")
    if need_shards and not any(Path(inputs.shards).glob("*.tar")):
        raise MissingInputError(f"bench: no training shards (*.tar) in {inputs.shards}: {hint}")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="cache store (`make cache`)")
    parser.add_argument("--shards", type=Path, default=DEFAULT_SHARDS, help="training shard directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def inputs_from(args: argparse.Namespace) -> Inputs:
    return Inputs(store=args.store, shards=args.shards, out=args.out, quick=args.quick, threads=args.threads)


def quiet_progress() -> None:
    """No tqdm bars from the library code the parts call (tqdm reads TQDM_DISABLE when it is first imported)."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")


def apply_threads(threads: int) -> None:
    """Set torch's CPU threads for this process (0 leaves torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- timing and statistics


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope * x`` and its coefficient of determination ``r2``."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"a line needs >= 2 points of equal length, got {len(x)} and {len(y)}")
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("all x are equal: no slope")
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y, strict=True))
    ss_tot = sum((b - my) ** 2 for b in y)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2}


def rounded(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


# ---------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def without_machine_paths(text: str, root: str | None = None) -> str:
    """``text`` with the working directory's absolute path removed (``/repo/data/x`` -> ``data/x``), so the
    committed results name no machine's directories."""
    import os

    root = os.path.abspath(root or os.getcwd())
    return text if root == os.sep else text.replace(root + os.sep, "")


def write_results(out: Path, name: str, payload: dict, markdown: str) -> None:
    """``out/name.json`` and ``out/name.md``, each written atomically, with repository-relative paths."""
    import json

    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(Path(out) / f"{name}.json", without_machine_paths(text).encode())
    atomic_write_bytes(Path(out) / f"{name}.md", without_machine_paths(markdown.rstrip() + "\n").encode())


def publish(out: Path, name: str, results: dict, figures: Callable[[dict], list],
            markdown: Callable[[dict], str], plot: Callable[[dict, Path], None] | None = None) -> dict:
    """A part's end: its headline figures into ``results``, then ``out/name.{json,md}`` (and ``.png``)."""
    results["figures"] = [f.to_dict() for f in figures(results)]
    write_results(out, name, results, markdown(results))
    if plot is not None:
        plot(results, Path(out) / f"{name}.png")
    return results


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine() -> dict:
    """What the numbers were measured on."""
    import os
    import platform

    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


def tiny_teachers(tokenizer_dir: Path, root: Path) -> tuple[str, str]:
    """(dual spec, single spec) names of a random-init open_clip CLIP and BLIP ITM of tests/conftest.py's tiny
    shapes (32 px), saved under ``root`` as local teachers: what the scale benchmarks build stores with."""
    import open_clip
    import torch
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    from mcad_cache.teachers import blip, dual
    from mcad_world.config import TowerShape
    from mcad_world.configs import IMAGE_MEAN, IMAGE_STD, blip_config, clip_model_cfg, clip_preprocess_cfg

    tiny, size, context = TowerShape(width=32, layers=1, heads=2, embed_dim=16, patch_size=8), 32, 24
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    clip_cfg = clip_model_cfg(tiny, size, len(tok), context, tok.sep_token_id)
    clip_spec = dual.save_local(open_clip.model.CLIP(**clip_cfg).eval(), clip_cfg, clip_preprocess_cfg(size),
                                tokenizer_dir, root / "clip")
    torch.manual_seed(0)
    ids = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id}
    model = BlipForImageTextRetrieval(blip_config(tiny, size, len(tok), context, ids)).eval()
    blip_spec = blip.save_local(model, tokenizer_dir, size, IMAGE_MEAN, IMAGE_STD, root / "blip")
    return clip_spec.name, blip_spec.name
