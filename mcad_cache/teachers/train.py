"""Train the default world's teachers on CPU in minutes and save them in hub layouts.

Real runs name hub teachers and skip this module. Here there is no hub, so the
embedded default trains three small teachers from scratch:

- two open_clip CLIPs of different widths (dual-stream; AMMKD needs two),
  trained with open_clip's own ``ClipLoss``;
- a BLIP ITM model (single-stream), trained as BLIP/ALBEF train it: ITC plus
  ITM on hard negatives drawn from the ITC similarities.

The training data is read into memory once (the default train split is ~250 MB
of uint8 pixels) so the steps are not bound by JPEG decoding.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from tqdm import tqdm
from transformers import AutoTokenizer, BlipForImageTextRetrieval

from mcad_cache.teachers import dual, single
from mcad_cache.teachers.configs import IMAGE_MEAN, IMAGE_STD, blip_config, clip_model_cfg, clip_preprocess_cfg
from pipeline.atomic import atomic_write_json
from pipeline.config import Schedule, TeachersConfig
from pipeline.optim import adamw_warmup_cosine
from pipeline.shards import ReadStats, list_shards, load_split
from pipeline.tokenizer import train_wordpiece

log = logging.getLogger(__name__)

BLIP_TEMPERATURE = 0.05


@dataclass
class CaptionTable:
    """Every caption of a split, tokenized once: row ``j`` belongs to image ``image_of[j]``."""

    input_ids: torch.Tensor  # (T, L)
    attention_mask: torch.Tensor  # (T, L)
    image_of: torch.Tensor  # (T,)
    first: torch.Tensor  # (N,) first caption row of each image
    count: torch.Tensor  # (N,) captions per image

    def sample(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random caption row per image."""
        offset = (torch.rand(len(images), generator=generator) * self.count[images]).long()
        return self.first[images] + offset


def tokenize_captions(tokenizer, captions: list[list[str]], context_length: int) -> CaptionTable:
    flat = [text for texts in captions for text in texts]
    encoded = tokenizer(flat, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    count = torch.tensor([len(texts) for texts in captions])
    first = torch.cumsum(count, 0) - count
    image_of = torch.repeat_interleave(torch.arange(len(captions)), count)
    return CaptionTable(encoded["input_ids"], encoded["attention_mask"], image_of, first, count)


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _optimizer(model: torch.nn.Module, schedule: Schedule):
    return adamw_warmup_cosine(model, schedule.lr, schedule.weight_decay, schedule.steps, schedule.warmup)


def _batches(n: int, schedule: Schedule, generator: torch.Generator):
    """Indices for ``schedule.steps`` batches: epochs of random permutations, no partial batches."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(schedule.steps):
        if len(order) < schedule.batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[: schedule.batch_size]
        order = order[schedule.batch_size :]


def _fit(
    model: torch.nn.Module,
    n_images: int,
    schedule: Schedule,
    seed: int,
    desc: str,
    batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
) -> dict:
    """The shared loop: AdamW + warmup/cosine, clip at norm 1; ``batch_loss(images, generator)``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer, scheduler = _optimizer(model, schedule)
    model.train()
    losses = []
    for images in tqdm(_batches(n_images, schedule, generator), total=schedule.steps, desc=desc, mininterval=5.0):
        loss = batch_loss(images, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return _loss_summary(losses)


def train_clip(
    model: open_clip.model.CLIP,
    pixels: torch.Tensor,
    table: CaptionTable,
    schedule: Schedule,
    seed: int,
    desc: str,
) -> dict:
    """Contrastive training with open_clip's ``ClipLoss``; returns the loss curve's ends."""
    loss_fn = ClipLoss()

    def batch_loss(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        out = model(pixels[images], table.input_ids[table.sample(images, generator)])
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    return _fit(model, len(pixels), schedule, seed, desc, batch_loss)


def blip_losses(
    model: BlipForImageTextRetrieval,
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    same_image: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """ITC plus ITM with one hard negative text per image and one hard negative image per text.

    Hard negatives are sampled from the ITC softmax (ALBEF), with the true pairs
    (``same_image``, B x B) masked out, so the ITM head learns exactly the
    distinctions the dual-stream similarity gets wrong.
    """
    vision = model.vision_model(pixel_values=pixels).last_hidden_state
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    image_feat = F.normalize(model.vision_proj(vision[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(text[:, 0]), dim=-1)
    logits = image_feat @ text_feat.t() / BLIP_TEMPERATURE
    target = same_image.float() / same_image.sum(1, keepdim=True)
    itc = 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target.t() * F.log_softmax(logits.t(), 1), 1).mean()
    )

    with torch.no_grad():
        weights = F.softmax(logits.float(), dim=1).masked_fill(same_image, 0) + 1e-8
        neg_text = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(weights.t().contiguous(), 1, generator=generator).squeeze(1)

    pair_vision = torch.cat([vision, vision, vision[neg_image]])
    pair_ids = torch.cat([input_ids, input_ids[neg_text], input_ids])
    pair_mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
    fused = model.text_encoder(
        input_ids=pair_ids,
        attention_mask=pair_mask,
        encoder_hidden_states=pair_vision,
        encoder_attention_mask=torch.ones(pair_vision.shape[:-1], dtype=torch.long),
    ).last_hidden_state[:, 0]
    batch = len(pixels)
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long()
    itm = F.cross_entropy(model.itm_head(fused), labels)
    return {"itc": itc, "itm": itm, "loss": itc + itm}


def train_blip(
    model: BlipForImageTextRetrieval,
    pixels: torch.Tensor,
    table: CaptionTable,
    schedule: Schedule,
    seed: int,
) -> dict:
    def batch_loss(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows = table.sample(images, generator)
        same_image = images[:, None] == images[None, :]
        terms = blip_losses(
            model, pixels[images], table.input_ids[rows], table.attention_mask[rows], same_image, generator
        )
        return terms["loss"]

    return _fit(model, len(pixels), schedule, seed, "blip", batch_loss)


def init_text_tower(model: BlipForImageTextRetrieval) -> None:
    """Re-initialize the BERT-style text tower's linear layers with std width^-0.5 (open_clip's scale).

    At BERT's std 0.02 a post-LayerNorm tower trained from scratch at this size gets
    attention-weight gradients hundreds of times smaller than open_clip's text tower
    and stays close to a bag of words, which cannot bind attributes.
    """
    std = model.config.text_config.hidden_size**-0.5
    with torch.no_grad():
        for module in model.text_encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)


def build_blip(cfg: TeachersConfig, tokenizer, image_size: int) -> BlipForImageTextRetrieval:
    """A fresh BLIP ITM model for ``tokenizer``'s vocabulary, text tower at open_clip's init scale."""
    tokens = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    model = BlipForImageTextRetrieval(blip_config(cfg.blip, image_size, len(tokenizer), cfg.context_length, tokens))
    init_text_tower(model)
    return model


def _loss_summary(losses: list[float]) -> dict:
    tail = losses[-max(1, len(losses) // 10) :]
    return {"first_loss": losses[0], "last_loss": sum(tail) / len(tail), "steps": len(losses)}


def train_teachers(cfg: TeachersConfig) -> dict:
    """Tokenizer, two CLIPs and a BLIP ITM, each saved in its hub layout under ``cfg.out_dir``.

    Returns (and writes to ``teachers.json``) where each teacher lives and how long it took.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    stats = ReadStats()
    train = load_split(list_shards(Path(cfg.data_dir) / "train"), policy=cfg.on_error, stats=stats)
    image_size = int(train.images.shape[-1])
    report: dict = {
        "config": cfg.to_dict(),
        "image_size": image_size,
        "n_train": len(train.keys),
        "skipped": dict(stats.by_reason),
    }

    start = time.perf_counter()
    tokenizer_dir = out / "tokenizer"
    train_wordpiece((text for texts in train.captions for text in texts), tokenizer_dir, cfg.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    table = tokenize_captions(tokenizer, train.captions, cfg.context_length)
    pixels = normalize_pixels(train.images)
    report["tokenizer"] = {"path": str(tokenizer_dir), "vocab_size": len(tokenizer), "seconds": _since(start)}

    for offset, (name, shape) in enumerate((("clip_a", cfg.clip_a), ("clip_b", cfg.clip_b))):
        start = time.perf_counter()
        torch.manual_seed(cfg.seed + offset)
        model_cfg = clip_model_cfg(shape, image_size, len(tokenizer), cfg.context_length, tokenizer.sep_token_id)
        model = open_clip.model.CLIP(**model_cfg, output_dict=True)
        summary = train_clip(model, pixels, table, cfg.clip_schedule, cfg.seed + offset, desc=name)
        spec = dual.save_local(model, model_cfg, clip_preprocess_cfg(image_size), tokenizer_dir, out / name)
        report[name] = {"spec": spec.name, **summary, "seconds": _since(start)}
        log.info("%s: %s", name, report[name])

    start = time.perf_counter()
    torch.manual_seed(cfg.seed + 2)
    model = build_blip(cfg, tokenizer, image_size)
    summary = train_blip(model, pixels, table, cfg.blip_schedule, cfg.seed + 2)
    spec = single.save_local(model, tokenizer_dir, image_size, IMAGE_MEAN, IMAGE_STD, out / "blip")
    report["blip"] = {"spec": spec.name, **summary, "seconds": _since(start)}

    atomic_write_json(out / "teachers.json", report)
    return report


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def load_report(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "teachers.json"
    if not path.exists():
        raise FileNotFoundError(f"no trained teachers at {out_dir} (missing {path.name}); run `mcad teachers` first")
    return json.loads(path.read_text())


