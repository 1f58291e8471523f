"""The ``mcad`` command: thin click commands that fill a config dataclass and call the library."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from pipeline.config import EvalConfig, TeachersConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """MCAD: run image-text teachers once into a cache, then distill small students from it.

    Typical order on the embedded default world: data -> teachers -> eval -> cache -> distill.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("data/default"), show_default=True,
              help="Directory that receives train/, val/, test/ shards and world.json.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-train", type=int, default=20000, show_default=True)
@click.option("--n-val", type=int, default=1000, show_default=True)
@click.option("--n-test", type=int, default=1000, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--captions-per-image", type=int, default=3, show_default=True)
@click.option("--samples-per-shard", type=int, default=1000, show_default=True)
def data(out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int, image_size: int,
         captions_per_image: int, samples_per_shard: int) -> None:
    """Generate the embedded default data set: a compositional image-text world.

    Writes webdataset shards in img2dataset's layout ({key}.jpg, {key}.txt,
    {key}.json with a "captions" list) to OUT/{train,val,test}/00000.tar ...
    Deterministic from --seed. Captions need attribute binding: every scene may
    have a twin with swapped colours or shapes and the same bag of words.
    """
    from pipeline.synth import WorldConfig, generate

    try:
        cfg = WorldConfig(seed=seed, image_size=image_size, n_train=n_train, n_val=n_val, n_test=n_test,
                          samples_per_shard=samples_per_shard, captions_per_image=captions_per_image)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    start = time.perf_counter()
    world = generate(out_dir, cfg)
    counts = {split: info["samples"] for split, info in world["splits"].items()}
    click.echo(f"wrote {out_dir} in {time.perf_counter() - start:.1f}s: {json.dumps(counts)} samples")


@main.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=Path("data/default"), show_default=True, help="World made by `mcad data` (reads train/).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts/teachers"),
              show_default=True, help="Receives tokenizer/, clip_a/, clip_b/, blip/ and teachers.json.")
@click.option("--clip-steps", type=int, default=TeachersConfig.clip_schedule.steps, show_default=True)
@click.option("--blip-steps", type=int, default=TeachersConfig.blip_schedule.steps, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--on-error", type=click.Choice(["raise", "warn"]), default="raise", show_default=True,
              help="Bad samples or shards: stop naming shard and key (raise), or skip and count them (warn).")
def teachers(data_dir: Path, out_dir: Path, clip_steps: int, blip_steps: int, seed: int, on_error: str) -> None:
    """Train the default world's teachers on CPU: two CLIPs (open_clip) and a BLIP ITM (transformers).

    Each is saved in its hub layout (open_clip local-dir, Hugging Face
    save_pretrained) and is loaded back by exactly the code that loads hub
    teachers. Real runs skip this and name hub teachers instead.
    """
    from mcad_cache.teachers.train import train_teachers

    defaults = TeachersConfig()
    cfg = replace(
        defaults,
        data_dir=data_dir,
        out_dir=out_dir,
        seed=seed,
        on_error=on_error,
        clip_schedule=replace(defaults.clip_schedule, steps=clip_steps),
        blip_schedule=replace(defaults.blip_schedule, steps=blip_steps),
    )
    report = train_teachers(cfg)
    if report["skipped"]:
        click.echo(f"skipped bad training samples: {report['skipped']}", err=True)
    for name in ("clip_a", "clip_b", "blip"):
        entry = report[name]
        click.echo(f"{name}: {entry['steps']} steps, loss {entry['first_loss']:.3f} -> {entry['last_loss']:.3f}, "
                   f"{entry['seconds']:.0f}s -> {entry['spec']}")


@main.command("eval")
@click.option("--shards", default=EvalConfig.shards, show_default=True,
              help="Shard directory, tar file or brace pattern to evaluate on.")
@click.option("--teachers", "teachers_dir", type=click.Path(path_type=Path), default=None,
              help="Directory written by `mcad teachers`: evaluates all of its teachers.")
@click.option("--dual", "duals", multiple=True,
              help="A dual-stream model as open_clip names it: 'ViT-B-16:openai', 'hf-hub:org/repo' or "
                   "'local-dir:PATH'. Repeatable.")
@click.option("--single", "singles", multiple=True,
              help="A BLIP ITM model: hub id or local directory. Repeatable.")
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
    both by their ITC embeddings and as re-rankers (ITM over the ITC top-k).
    An image query is a hit if any of its captions is in the top k.
    """
    from pipeline.jobs import evaluate_models, format_table
    from pipeline.shards import ShardReadError

    cfg = EvalConfig(shards=shards, rerank_k=rerank_k, out_json=out_json, on_error=on_error)
    try:
        results, skipped = evaluate_models(cfg, teachers_dir, list(duals), list(singles))
    except (FileNotFoundError, ValueError, ShardReadError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(format_table(results))
    if skipped:
        click.echo(f"skipped bad samples: {skipped}", err=True)


def _not_built(stage: str, issue: int) -> None:
    click.echo(f"`mcad {stage}` is not built yet (tracked in issue #{issue}).", err=True)
    sys.exit(2)


@main.command()
def cache() -> None:
    """Stage 1: run the teachers once and write the Zarr cache (not built yet)."""
    _not_built("cache", 4)


@main.command()
def distill() -> None:
    """Stage 2: train a student from the cache alone (not built yet)."""
    _not_built("distill", 5)


if __name__ == "__main__":
    main()
