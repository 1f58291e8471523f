"""The CLIP teachers' training step with open_clip's two attention blocks, side by side in one process.

``clip_model_cfg`` names open_clip's custom block (``block_type="custom"``: its own ``Attention``,
one fused q/k/v ``F.linear`` and ``scaled_dot_product_attention``) where open_clip's default
block is ``nn.MultiheadAttention``. The parameters have the same names, so one state dict loads
into both; ``build_clip`` relies on that to start the custom block from the default block's
initialization.

For each CLIP shape of ``TeachersConfig`` this builds both models from the same weights, checks
that they give the same embeddings, then times one training step of each (forward, open_clip's
``ClipLoss``, backward, gradient clipping, AdamW) at the teacher batch size on random 64 px images
and random captions of the context length. The steps are interleaved round by round after a
warmup round; each figure is the median. Needs no inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import Figure, apply_threads, machine, markdown_table, median, publish, rounded
from bench.step_time import Variant, run_interleaved

NAME = "clip_block"
BLOCKS = ("default", "custom")
SHAPES = ("clip_a", "clip_b")


def measure(rounds: int, batch_size: int, image_size: int = 64) -> dict:
    from open_clip.loss import ClipLoss

    from mcad_cache.teachers.configs import build_clip, clip_model_cfg, with_block_type
    from pipeline.config import TeachersConfig

    cfg = TeachersConfig()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    texts = torch.randint(5, cfg.vocab_size, (batch_size, cfg.context_length), generator=generator)
    loss_fn = ClipLoss()
    variants, agreement = [], {}
    for name in SHAPES:
        model_cfg = clip_model_cfg(getattr(cfg, name), image_size, cfg.vocab_size, cfg.context_length, eos_id=3,
                                   no_ln_pre=not cfg.clip_ln_pre)
        torch.manual_seed(0)
        custom = build_clip(model_cfg, output_dict=True)
        default = build_clip(with_block_type(model_cfg, "default"), output_dict=True)
        default.load_state_dict(custom.state_dict())
        models = {"default": default, "custom": custom}
        with torch.no_grad():
            outs = [m.eval()(images[:16], texts[:16]) for m in models.values()]
        agreement[name] = max(float((outs[0][k] - outs[1][k]).abs().max()) for k in ("image_features", "text_features"))
        for block, model in models.items():
            optimizer = torch.optim.AdamW(model.train().parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer) -> None:
                out = model(images, texts)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

            variants.append(Variant(f"{name}/{block}", step, step, rounds))
    times = run_interleaved(variants, warmup=1)
    seconds = {name: {block: times[f"{name}/{block}"] for block in BLOCKS} for name in SHAPES}
    medians = {name: {b: median(t) for b, t in by.items()} for name, by in seconds.items()}
    return {
        "machine": machine(),
        "settings": {"batch_size": batch_size, "image_size": image_size, "context_length": cfg.context_length,
                     "rounds": rounds},
        "embedding_max_abs_diff": agreement,
        "seconds": seconds,
        "median_seconds": {name: {b: rounded(s) for b, s in by.items()} for name, by in medians.items()},
        "speedup": {name: rounded(by["default"] / by["custom"], 3) for name, by in medians.items()},
    }


def figures(results: dict) -> list[Figure]:
    return [Figure(NAME, f"{name} training step speedup, custom over default block", value, "x", "", None)
            for name, value in results["speedup"].items()]


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = [[name, by["default"], by["custom"], results["speedup"][name], results["embedding_max_abs_diff"][name]]
            for name, by in results["median_seconds"].items()]
    return "\n".join([
        "# CLIP teachers: open_clip's default vs custom attention block",
        "",
        f"One training step, batch {s['batch_size']}, {s['image_size']} px, {s['context_length']} tokens; medians "
        f"of {s['rounds']} interleaved rounds, seconds. Embedding difference: largest absolute difference of "
        "the two blocks' embeddings for the same weights.",
        "",
        markdown_table(["model", "default block", "custom block", "speedup", "embedding difference"], rows),
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
