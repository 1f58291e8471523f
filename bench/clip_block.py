"""The CLIP teachers' training step four ways, side by side in one process.

- ``default``: open_clip's default block (``nn.MultiheadAttention``), one graph per step on all threads;
- ``custom``: open_clip's custom block, which ``clip_model_cfg`` names, one graph per step;
- ``custom_split``: the custom block with the batch encoded in two slices by two threads with one
  intra-op thread each (``SplitBatch``, what `mcad teachers` does with ``clip_workers=2``);
- ``custom_split_uncut``: the same with every caption run over all context positions, as
  ``CLIP.encode_text`` runs it; the other ways cut each slice's captions to its longest
  (``encode_text_cut``, what `mcad teachers` does).

``clip_model_cfg`` names open_clip's custom block (``block_type="custom"``: its own ``Attention``,
one fused q/k/v ``F.linear`` and ``scaled_dot_product_attention``) where open_clip's default
block is ``nn.MultiheadAttention``. The parameters have the same names, so one state dict loads
into both; ``build_clip`` relies on that to start the custom block from the default block's
initialization.

For each CLIP shape of ``TeachersConfig`` this builds the models from the same weights, checks
that the blocks give the same embeddings, then times one training step of each (forward, open_clip's
``ClipLoss``, backward, gradient clipping, AdamW) at the teacher batch size on random 64 px images
and random captions of the default world's lengths (7-19 tokens, padded to the context length).
The steps are interleaved round by round after a warmup round; each figure is the median.
Needs no inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import Figure, apply_threads, machine, markdown_table, median, publish, rounded
from bench.step_time import Variant, run_interleaved

NAME = "clip_block"
EOS_ID = 3
WAYS = ("default", "custom", "custom_split", "custom_split_uncut")
SPLIT_WAYS = ("custom_split", "custom_split_uncut")
SHAPES = ("clip_a", "clip_b")


def measure(rounds: int, batch_size: int, image_size: int = 64) -> dict:
    from open_clip.loss import ClipLoss

    from mcad_world.configs import build_clip, clip_model_cfg, with_block_type
    from mcad_world.parallel import SplitBatch
    from mcad_world.train import clip_loss
    from mcad_world.config import TeachersConfig

    cfg = TeachersConfig()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    texts = torch.randint(5, cfg.vocab_size, (batch_size, cfg.context_length), generator=generator)
    lengths = torch.randint(7, 20, (batch_size,), generator=generator)  # the default world's: 13 on average, 19 at most
    texts[torch.arange(batch_size), lengths - 1] = EOS_ID
    texts[torch.arange(cfg.context_length)[None, :] >= lengths[:, None]] = 0  # right padding
    loss_fn = ClipLoss()
    threads = torch.get_num_threads()
    variants, agreement, splits = [], {}, []
    for name in SHAPES:
        model_cfg = clip_model_cfg(getattr(cfg, name), image_size, cfg.vocab_size, cfg.context_length, eos_id=EOS_ID,
                                   no_ln_pre=not cfg.clip_ln_pre)
        torch.manual_seed(0)
        models = {way: build_clip(with_block_type(model_cfg, "default") if way == "default" else model_cfg,
                                  output_dict=True) for way in WAYS}
        for model in models.values():
            model.load_state_dict(models["custom"].state_dict())
        with torch.no_grad():
            outs = [models[way].eval()(images[:16], texts[:16]) for way in ("default", "custom")]
        agreement[name] = max(float((outs[0][k] - outs[1][k]).abs().max()) for k in ("image_features", "text_features"))
        for way, model in models.items():
            optimizer = torch.optim.AdamW(model.train().parameters(), lr=1e-4)
            split = SplitBatch(2, model.parameters()) if way in SPLIT_WAYS else None
            splits += [split] if split is not None else []

            def step(model=model, optimizer=optimizer, split=split, cut=way != "custom_split_uncut") -> None:
                torch.set_num_threads(threads if split is None else 1)
                optimizer.zero_grad(set_to_none=True)
                loss = clip_loss(model, loss_fn, images, texts, split, cut_text=cut)
                if split is None:
                    loss.backward()
                else:
                    split.backward(loss)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

            variants.append(Variant(f"{name}/{way}", step, step, rounds))
    try:
        times = run_interleaved(variants, warmup=1)
    finally:
        for split in splits:
            split.close()
        torch.set_num_threads(threads)
    seconds = {name: {way: times[f"{name}/{way}"] for way in WAYS} for name in SHAPES}
    medians = {name: {w: median(t) for w, t in by.items()} for name, by in seconds.items()}
    return {
        "machine": machine(),
        "settings": {"batch_size": batch_size, "image_size": image_size, "context_length": cfg.context_length,
                     "rounds": rounds},
        "embedding_max_abs_diff": agreement,
        "seconds": seconds,
        "median_seconds": {name: {b: rounded(s) for b, s in by.items()} for name, by in medians.items()},
        "speedup": {name: {w: rounded(by["default"] / by[w], 3) for w in WAYS[1:]} for name, by in medians.items()},
        "text_cut_speedup": {name: rounded(by["custom_split_uncut"] / by["custom_split"], 3)
                             for name, by in medians.items()},
    }


def figures(results: dict) -> list[Figure]:
    return [Figure(NAME, f"{name} training step speedup, {way} over default", value, "x", "", None)
            for name, by in results["speedup"].items() for way, value in by.items()]


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = [[name, by["default"], by["custom"], by["custom_split_uncut"], by["custom_split"],
             results["speedup"][name]["custom"], results["speedup"][name]["custom_split_uncut"],
             results["speedup"][name]["custom_split"], results["text_cut_speedup"][name],
             results["embedding_max_abs_diff"][name]]
            for name, by in results["median_seconds"].items()]
    return "\n".join([
        "# CLIP teachers' training step: attention block and batch split",
        "",
        f"One training step, batch {s['batch_size']}, {s['image_size']} px, {s['context_length']} tokens; medians "
        f"of {s['rounds']} interleaved rounds, seconds; speedups over the default block. Split: the batch in two "
        "slices on two threads with one intra-op thread each; cut: each slice's captions cut to its longest "
        "(captions of 7-19 tokens; the other ways cut too). Embedding difference: largest absolute difference "
        "of the two blocks' embeddings for the same weights.",
        "",
        markdown_table(["model", "default block", "custom block", "split, uncut", "split, cut (default)",
                        "custom speedup", "split uncut speedup", "split cut speedup", "cut over uncut",
                        "embedding difference"], rows),
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    results = measure(args.rounds, args.batch_size)
    publish(args.out, NAME, results, figures, markdown)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
