"""BLIP's fused pass three ways, side by side in one process.

The fused pass cross-attends each (image, text) pair's text to the image's tokens; the
teacher's training step and ITM re-ranking both run it on hundreds of pairs. Ways:

- ``padded``: what HF's BLIP does: every pair carries its own copy of the image tokens, so each
  cross-attention projects them per pair, and all captions are padded to the longest;
- ``kv_per_image``: ``fused_states(image_rows=...)``: each image's cross-attention keys and values
  are computed once and gathered per pair with ``index_select`` (autograd's own backward);
- ``kv_per_group``: keys and values per image, and the pairs run in ``LENGTH_GROUPS`` groups of
  similar caption length, each cut to its longest caption; each group projects the keys and values
  of the images it uses and gathers them with ``index_select`` (the default until December 2026);
- ``by_length`` (the default, ``fused_states_by_length``): the same groups, with the keys and values
  of every image projected once for the whole pass, and gathered by ``_GatherRows``, whose backward
  is one ``index_add_`` instead of autograd's element-wise scatter.

Jobs, on the default world's shapes:

- ``train_step``: one BLIP training step as `mcad teachers` runs it (``recipe_losses`` with the
  default ``BlipRecipe``: ITC, one mined negative per side, one caption edit per image,
  listwise ITM, MLM; the locked image tower's tokens read from a table), backward and AdamW step;
- ``rescore``: ITM of every image with 16 captions (what ``mcad eval`` and the cache's rescore
  pass do), in pair batches of 512, captions padded to the context length as the teacher tokenizes.

First the ways are checked to agree (ITM logits, loss terms); then they are interleaved round
by round after a warmup round, and each figure is the median. Inputs: a BLIP teacher directory
(`make teachers` writes artifacts/teachers/blip, with its tokenizer) and the training shards.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.common import (Figure, MissingInputError, apply_threads, machine, markdown_table, median, publish,
                          quiet_progress, rounded, timed)

NAME = "fused_pass"
VARIANTS = ("padded", "kv_per_image", "kv_per_group", "by_length")


class _AutogradGather:
    """Stands in for ``single._GatherRows``: plain ``index_select``, differentiated by autograd."""

    @staticmethod
    def apply(source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return source.index_select(0, rows)


@contextmanager
def _autograd_gather(single):
    original = single._GatherRows
    single._GatherRows = _AutogradGather
    try:
        yield
    finally:
        single._GatherRows = original


def _ways(single) -> dict:
    """Stand-ins for ``fused_states_by_length``, one per way (``by_length`` is the function itself)."""
    fused_states = single.fused_states

    def padded(model, input_ids, attention_mask, image_tokens, image_rows=None, groups=None):
        tokens = image_tokens if image_rows is None else image_tokens[image_rows]
        return fused_states(model, input_ids, attention_mask, tokens)

    def kv_per_image(model, input_ids, attention_mask, image_tokens, image_rows=None, groups=None):
        with _autograd_gather(single):
            return fused_states(model, input_ids, attention_mask, image_tokens, image_rows)

    def kv_per_group(model, input_ids, attention_mask, image_tokens, image_rows=None, groups=single.LENGTH_GROUPS):
        order = attention_mask.sum(1).argsort(stable=True)
        with _autograd_gather(single):
            parts = [single._fused_runs(model, input_ids, attention_mask, image_tokens, image_rows, [run], cut=True)
                     for run in order.tensor_split(min(groups, len(order)))]
        return torch.cat(parts).index_select(0, order.argsort())

    return {"padded": padded, "kv_per_image": kv_per_image, "kv_per_group": kv_per_group}


def measure(blip_dir: Path, shards: Path, rounds: int, batch_size: int, images: int, k: int = 16,
            edits: bool = True) -> dict:
    """Time the three ways, interleaved; first check they agree (ITM logits and every training loss term)."""
    from mcad_cache.teachers import blip as single
    from mcad_world.negatives import CaptionEdits
    from mcad_world.train import image_tokens, masked_words_for, normalize_pixels, recipe_losses, tokenize_captions
    from mcad_world.config import TeachersConfig
    from mcad_core.shards import list_shards, load_split
    from mcad_world.synth import CAPTION_WORDS, RELATION_FLIPS

    if not (blip_dir / "config.json").exists():
        raise MissingInputError(f"bench: no BLIP teacher at {blip_dir}: run `make data teachers` first")
    if not any(shards.glob("*.tar")):
        raise MissingInputError(f"bench: no shards in {shards}: run `make data` first")
    cfg = TeachersConfig()
    teacher = single.BlipItmTeacher.load(single.SingleTeacherSpec(str(blip_dir)))
    model, tokenizer = teacher.model, teacher.processor.tokenizer
    data = load_split(list_shards(shards)[:2])
    n = min(len(data), max(batch_size, images, k))
    batch_size, images = min(batch_size, n), min(images, n)
    table = tokenize_captions(tokenizer, data.captions[:n], teacher.context_length)
    tokens = image_tokens(model, normalize_pixels(data.images[:n]))
    mlm = masked_words_for(model, tokenizer, cfg.blip.mask_prob)
    edit_rule = CaptionEdits.from_words(tokenizer, CAPTION_WORDS, RELATION_FLIPS) if edits else None
    model.vision_model.requires_grad_(False)
    trained = torch.nn.ModuleDict({"blip": model, "mlm": mlm})
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-5)
    batch = torch.arange(batch_size)
    rows = table.sample(batch, torch.Generator().manual_seed(0))
    mask = table.attention_mask[rows]
    length = int(mask.sum(1).max())
    same = batch[:, None] == batch[None, :]

    def losses() -> dict[str, torch.Tensor]:
        return recipe_losses(model, tokens[batch], table.input_ids[rows, :length], mask[:, :length], same,
                             torch.Generator().manual_seed(1), cfg.blip, mlm, edit_rule)

    def train_step() -> None:
        trained.train()
        terms = losses()
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    ids, attention = table.input_ids[table.first[:n]], table.attention_mask[table.first[:n]]
    candidates = torch.randint(0, n, (images, min(k, n)), generator=torch.Generator().manual_seed(2))
    pair_images = torch.arange(images).repeat_interleave(candidates.shape[1])
    pair_texts = candidates.reshape(-1)

    @torch.no_grad()
    def rescore() -> torch.Tensor:
        trained.eval()
        return torch.cat([
            teacher.itm(tokens, single.TextBatch(ids[pair_texts[s : s + 512]], attention[pair_texts[s : s + 512]]),
                        image_rows=pair_images[s : s + 512]).logits
            for s in range(0, len(pair_images), 512)
        ])

    original = single.fused_states_by_length
    ways = {**_ways(single), "by_length": original}
    jobs = {"train_step": train_step, "rescore": rescore}
    seconds: dict[str, dict[str, list[float]]] = {job: {v: [] for v in VARIANTS} for job in jobs}
    try:
        outputs = {}
        for variant in VARIANTS:
            single.fused_states_by_length = ways[variant]
            trained.eval()  # no dropout, so every way sees the same function
            with torch.no_grad():
                outputs[variant] = (rescore(), losses())
        logits, terms = outputs["padded"]
        agreement = {
            "itm_logits_max_abs_diff": max(float((o[0] - logits).abs().max()) for o in outputs.values()),
            "loss_terms_max_abs_diff": max(float((o[1][t] - terms[t]).abs()) for o in outputs.values() for t in terms),
        }
        for r in range(rounds + 1):
            for job, fn in jobs.items():
                for variant in VARIANTS:
                    single.fused_states_by_length = ways[variant]
                    took = timed(fn)
                    if r:  # round 0 warms up
                        seconds[job][variant].append(took)
    finally:
        single.fused_states_by_length = original
    medians = {job: {v: median(t) for v, t in by.items()} for job, by in seconds.items()}
    return {
        "machine": machine(),
        "settings": {"blip": str(blip_dir), "batch_size": batch_size, "rescore_images": images,
                     "rescore_k": int(candidates.shape[1]), "rounds": rounds, "caption_edits": edits},
        "agreement": agreement,
        "seconds": seconds,
        "median_seconds": {job: {v: rounded(s) for v, s in by.items()} for job, by in medians.items()},
        "speedup": {job: {v: rounded(by["padded"] / by[v], 3) for v in VARIANTS[1:]} for job, by in medians.items()},
    }


def figures(results: dict) -> list[Figure]:
    return [Figure(NAME, f"{job} speedup, {way} over padded", value, "x", "", None)
            for job, by in results["speedup"].items() for way, value in by.items()]


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = [[job, *(by[v] for v in VARIANTS), *results["speedup"][job].values()]
            for job, by in results["median_seconds"].items()]
    return "\n".join([
        "# BLIP's fused pass: padded per pair vs keys/values per image vs grouped by caption length (keys/values per group or once)",
        "",
        f"BLIP teacher `{s['blip']}`; train step: batch {s['batch_size']} with the `mcad teachers` "
        f"defaults; rescore: {s['rescore_images']} images x {s['rescore_k']} captions. Medians of "
        f"{s['rounds']} interleaved rounds, seconds; speedups are padded / way.",
        "",
        markdown_table(["job", *VARIANTS, *(f"speedup {v}" for v in VARIANTS[1:])], rows),
        "",
        "The ways agree before timing: largest ITM logit difference "
        f"{results['agreement']['itm_logits_max_abs_diff']:.2g}, largest loss-term difference "
        f"{results['agreement']['loss_terms_max_abs_diff']:.2g}.",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blip", type=Path, default=Path("artifacts/teachers/blip"), help="BLIP teacher directory")
    parser.add_argument("--shards", type=Path, default=Path("data/default/train"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=128, help="images re-ranked against 16 captions each")
    parser.add_argument("--no-edits", action="store_true",
                        help="train step without caption-edit negatives (for tokenizers lacking the world's words)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    quiet_progress()
    apply_threads(args.threads)
    results = measure(args.blip, args.shards, args.rounds, args.batch_size, args.images, edits=not args.no_edits)
    publish(args.out, NAME, results, figures, markdown)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
