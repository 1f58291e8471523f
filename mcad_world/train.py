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

import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transformer import text_global_pool
from tqdm import tqdm
from transformers import AutoTokenizer, BlipForImageTextRetrieval

from mcad_cache.teachers import blip, dual
from mcad_world.negatives import CaptionEdits, edits_from_world
from mcad_world.configs import (
    IMAGE_MEAN,
    IMAGE_STD,
    blip_config,
    build_clip,
    clip_model_cfg,
    clip_preprocess_cfg,
)
from mcad_world.parallel import SplitBatch
from mcad_cache.teachers.specs import load_report
from mcad_core.atomic import atomic_write_json
from mcad_world.config import TEACHERS, BlipRecipe, Schedule, TeachersConfig, check_schedule, check_shape
from mcad_core.config import EvalConfig
from mcad_core.optim import adamw_warmup_cosine
from mcad_core.shards import ReadStats, iter_samples, list_shards, load_split
from mcad_world.tokenizer import train_wordpiece

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


class NormalizedPixels:
    """uint8 images (N, 3, H, W) that hand out normalized float32 rows as they are taken (``pixels[rows]``).

    The teachers train on every image of their split many times over; normalizing the rows each batch takes,
    rather than the whole split once, gives the same values and keeps 4x less in memory: a 100k-image split
    of 96 px images is 2.8 GB as uint8 and 11 GB as float32, which (with the temporaries of normalizing it
    whole and BLIP's image-token table) ran a 24 GB machine out of memory.
    """

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"NormalizedPixels holds uint8 images, got {images.dtype}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> torch.Tensor:
        return normalize_pixels(self.images[rows])


Pixels = torch.Tensor | NormalizedPixels  # what the training functions index: normalized rows either way


def schedule_optimizer(model: torch.nn.Module, schedule: Schedule):
    return adamw_warmup_cosine(model, schedule.lr, schedule.weight_decay, schedule.steps, schedule.warmup)


def schedule_batches(n: int, schedule: Schedule, generator: torch.Generator):
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
    batch_loss: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> dict:
    """The shared loop: AdamW + warmup/cosine, clip at norm 1.

    ``batch_loss(images, generator)`` returns named terms with their sum as ``"loss"``;
    the progress bar shows them, and the summary holds each term's first value and
    its mean over the last tenth of the steps. ``backward(loss)`` fills the gradients.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer, scheduler = schedule_optimizer(model, schedule)
    model.train()
    history: dict[str, list[float]] = {}
    progress = tqdm(schedule_batches(n_images, schedule, generator), total=schedule.steps, desc=desc, mininterval=5.0)
    for images in progress:
        terms = batch_loss(images, generator)
        optimizer.zero_grad(set_to_none=True)
        backward(terms["loss"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for name, value in terms.items():
            history.setdefault(name, []).append(value.item())
        progress.set_postfix({name: f"{values[-1]:.3f}" for name, values in history.items()}, refresh=False)
    model.eval()
    return _loss_summary(history)


def encode_text_cut(model: open_clip.model.CLIP, ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """``model.encode_text(ids, normalize=True)``, run on the captions cut to the longest one.

    The text tower is causal and pools the ``[SEP]`` token, so no real token reads
    the (right-)padding after it: cutting the padding leaves every output the same up
    to float rounding, and a batch's longest caption is 19 of the 24 positions.
    A tower without the causal mask would read the padding, so it runs uncut.
    """
    if model.attn_mask is None:
        return model.encode_text(ids, normalize=True)
    length = int((ids != pad_id).sum(1).max())
    ids = ids[:, :length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1)


def clip_loss(
    model: open_clip.model.CLIP,
    loss_fn: ClipLoss,
    pixels: torch.Tensor,
    texts: torch.Tensor,
    split: SplitBatch | None = None,
    cut_text: bool = True,
) -> torch.Tensor:
    """``loss_fn`` over the batch's normalized embeddings, encoded in ``split``'s slices when given.

    With ``split``, back-propagate with ``split.backward(loss)``, not ``loss.backward()``.
    ``cut_text``: each slice's captions run cut to its longest (``encode_text_cut``); else all positions.
    """

    def encode(images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = encode_text_cut(model, ids) if cut_text else model.encode_text(ids, normalize=True)
        return model.encode_image(images, normalize=True), text

    features = encode(pixels, texts) if split is None else split.forward(encode, pixels, texts)
    return loss_fn(*features, model.logit_scale.exp())


def train_clip(
    model: open_clip.model.CLIP,
    pixels: Pixels,
    table: CaptionTable,
    schedule: Schedule,
    seed: int,
    desc: str,
    workers: int = 1,
) -> dict:
    """Contrastive training with open_clip's ``ClipLoss``; returns the loss curve's ends.

    With ``workers`` > 1 each step's batch is encoded in that many slices by
    threads with one intra-op thread each (``SplitBatch``), and the loss is taken
    over the whole batch's features as before.
    """
    loss_fn = ClipLoss()
    split = SplitBatch(workers, model.parameters()) if workers > 1 else None

    def batch_loss(images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        texts = table.input_ids[table.sample(images, generator)]
        return {"loss": clip_loss(model, loss_fn, pixels[images], texts, split)}

    if split is None:
        return _fit(model, len(pixels), schedule, seed, desc, batch_loss)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main thread's loss and AdamW too: no third thread team on the cores
    try:
        return _fit(model, len(pixels), schedule, seed, desc, batch_loss, backward=split.backward)
    finally:
        split.close()
        torch.set_num_threads(threads)


class MaskedWords(torch.nn.Module):
    """Image-conditioned masked-word prediction: a training device of the BLIP teacher, not saved with it.

    ``BlipForImageTextRetrieval`` has no language-model head, so this one (a linear
    map from the fused hidden states to the vocabulary) lives only while the
    teacher trains. ``prob`` of the real (non-special, non-padding) tokens are
    replaced by ``[MASK]``.
    """

    def __init__(self, hidden: int, vocab: int, special_ids: Sequence[int], mask_id: int, prob: float = 0.3):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)
        self.register_buffer("special", torch.tensor(sorted(set(special_ids))), persistent=False)
        self.mask_id = mask_id
        self.prob = prob

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Which tokens to mask: a random ``prob`` of the real words."""
        words = attention_mask.bool() & ~torch.isin(input_ids, self.special)
        return words & (torch.rand(input_ids.shape, generator=generator) < self.prob)

    def inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions with ``[MASK]`` in place of the drawn words, and which tokens those are."""
        masked = self.mask(input_ids, attention_mask, generator)
        return input_ids.masked_fill(masked, self.mask_id), masked

    def loss(self, states: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the masked words, read from the fused states of the masked captions."""
        if not masked.any():
            return states.sum() * 0.0
        return F.cross_entropy(self.head(states[masked]), input_ids[masked])


def masked_words_for(model: BlipForImageTextRetrieval, tokenizer, prob: float = 0.3) -> MaskedWords:
    special = [i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if i is not None]
    if tokenizer.mask_token_id is None:
        raise ValueError("the BLIP teacher's MLM loss needs a tokenizer with a [MASK] token")
    return MaskedWords(model.config.text_config.hidden_size, len(tokenizer), special, tokenizer.mask_token_id, prob)


def blip_losses(
    model: BlipForImageTextRetrieval,
    vision: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    same_image: torch.Tensor,
    generator: torch.Generator,
    negatives: int = 1,
    listwise: bool = False,
    mlm: MaskedWords | None = None,
    random_negatives: int = 0,
    edits: CaptionEdits | None = None,
    uniform_share: float = 0.0,
    split_negatives: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """ITC, ITM on hard negatives (``negatives`` texts per image and images per text) and, with ``mlm``, MLM.

    ``vision`` is the image tower's token sequence for the batch (B, tokens, width):
    computed with gradients when the tower trains, read from a table when it is frozen.
    Hard negatives are sampled from the ITC softmax without replacement (ALBEF),
    with the true pairs (``same_image``, B x B) masked out, so the ITM head learns
    exactly the distinctions the dual-stream similarity gets wrong. ``itm`` is
    ALBEF's binary cross-entropy over all pairs. With ``listwise``, ``itm_list``
    adds a softmax cross-entropy over each query's group (its true pair and its
    negatives) on the match-minus-no-match logit, the score re-ranking sorts by.

    ``random_negatives`` more per image and per text are drawn uniformly from the
    non-matching rows. Trained from scratch, ITC soon makes every mined negative
    a near twin, and an ITM head that has not yet learned to look at the image
    gets no easy pair to start from; uniform negatives keep some in every batch.

    ``mlm`` adds ALBEF's third loss: masked words predicted by the text encoder
    *with* cross-attention to the image. From scratch it is what makes ITM learn at
    all: with balanced negatives every image and every text is as often a match as
    not, so ITM's signal lies only in the image-text interaction, and at random init
    its gradient toward one is ~0 (the loss sits at ln 2). Filling in "a [MASK]
    circle" from the image gives the cross-attention a first-order signal to look
    up the right object's attributes, which is the interaction ITM needs. The
    masked captions ride in the same fused pass as the ITM pairs.

    ``uniform_share`` mixes that share of a uniform draw over the non-matching
    rows into the mined negatives' distribution: one negative per query that is
    sometimes easy, at no extra cost (``random_negatives`` adds pairs instead).

    ``split_negatives(text_feat, generator)`` returns (B, m, tokens, width): the
    image tokens of m more negatives per text, mined from the whole split rather
    than the batch (see ``SplitNegatives``); they join each text's listwise group.

    ``edits`` adds one rule-made negative caption per image (an attribute replaced
    or swapped, or the relation flipped; see ``negatives.py``), scored by ITM only.
    """
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    image_feat = F.normalize(model.vision_proj(vision[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(text[:, 0]), dim=-1)
    logits = image_feat @ text_feat.t() / BLIP_TEMPERATURE
    target = same_image.float() / same_image.sum(1, keepdim=True)
    itc = 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target.t() * F.log_softmax(logits.t(), 1), 1).mean()
    )

    batch = len(vision)
    with torch.no_grad():
        neg_text = neg_image = torch.empty(batch, 0, dtype=torch.long)
        if negatives:
            weights = F.softmax(logits.float(), dim=1).masked_fill(same_image, 0) + 1e-8
            by_text = weights.t().contiguous()
            if uniform_share:
                weights, by_text = (_mix_uniform(w, ~same, uniform_share) for w, same in
                                    ((weights, same_image), (by_text, same_image.t())))
            neg_text = torch.multinomial(weights, negatives, generator=generator)  # (B, n): texts for image i
            neg_image = torch.multinomial(by_text, negatives, generator=generator)  # images for text j
        if random_negatives:
            uniform = (~same_image).float() + 1e-8
            neg_text = torch.cat([neg_text, torch.multinomial(uniform, random_negatives, generator=generator)], 1)
            neg_image = torch.cat(
                [neg_image, torch.multinomial(uniform.t().contiguous(), random_negatives, generator=generator)], 1
            )
    per_query = negatives + random_negatives  # negatives per image and per text
    rows = torch.arange(batch)
    image_rows = torch.cat([rows, rows.repeat_interleave(per_query), neg_image.reshape(-1)])
    text_rows = torch.cat([rows, neg_text.reshape(-1), rows.repeat_interleave(per_query)])
    pair_ids, pair_mask, images = input_ids[text_rows], attention_mask[text_rows], vision
    from_split = 0
    if split_negatives is not None:
        extra = split_negatives(text_feat.detach(), generator)  # (B, m, tokens, width)
        from_split = extra.shape[1]
        pair_ids = torch.cat([pair_ids, input_ids.repeat_interleave(from_split, 0)])
        pair_mask = torch.cat([pair_mask, attention_mask.repeat_interleave(from_split, 0)])
        images = torch.cat([images, extra.flatten(0, 1)])
        image_rows = torch.cat([image_rows, batch + torch.arange(batch * from_split)])
    if edits is not None:
        edited, valid = edits(input_ids, generator)
        pair_ids = torch.cat([pair_ids, edited[valid]])
        pair_mask = torch.cat([pair_mask, attention_mask[valid]])
        image_rows = torch.cat([image_rows, rows[valid]])
    pairs = len(pair_ids)
    if mlm is not None:  # the masked captions, each with its own image, join the same fused pass
        masked_ids, masked = mlm.inputs(input_ids, attention_mask, generator)
        pair_ids, pair_mask = torch.cat([pair_ids, masked_ids]), torch.cat([pair_mask, attention_mask])
        image_rows = torch.cat([image_rows, rows])
    states = blip.fused_states_by_length(model, pair_ids, pair_mask, images, image_rows)
    fused = states[:pairs, 0]
    two_way = model.itm_head(fused)
    labels = torch.zeros(len(fused), dtype=torch.long)
    labels[:batch] = 1
    terms = {"itc": itc, "itm": F.cross_entropy(two_way, labels)}
    if listwise:
        score = two_way[:, 1] - two_way[:, 0]
        sizes = [batch, batch * per_query, batch * per_query, batch * from_split]
        positive, text_neg, image_neg, split_neg, edit_neg = score.split([*sizes, len(score) - sum(sizes)])
        i2t = torch.cat([positive[:, None], text_neg.view(batch, per_query)], 1)
        if edits is not None:  # the edited caption joins its image's group; -inf where no edit applied
            edited_score = torch.full((batch,), float("-inf"), dtype=score.dtype).masked_scatter(valid, edit_neg)
            i2t = torch.cat([i2t, edited_score[:, None]], 1)
        t2i = torch.cat([positive[:, None], image_neg.view(batch, per_query), split_neg.view(batch, from_split)], 1)
        zero = torch.zeros(batch, dtype=torch.long)
        terms["itm_list"] = 0.5 * (F.cross_entropy(i2t, zero) + F.cross_entropy(t2i, zero))
    if mlm is not None:
        terms["mlm"] = mlm.loss(states[pairs:], input_ids, masked)
    terms["loss"] = sum(terms.values())
    return terms


@dataclass
class SplitNegatives:
    """Text-to-image ITM negatives mined from every training image, as re-ranking will meet them.

    ``mcad eval`` re-ranks each text's ITC top-k over the whole test split, while
    in-batch mining only ever shows ITM a batch's nearest images. With a locked
    image tower every image's tokens are at hand (``tokens``), and ITC's image
    features for the whole split are one small matmul (``vision_proj`` of the
    class tokens), so each text gets ``count`` images drawn uniformly from its
    ITC top ``top`` (its own image excluded): the candidates it will be re-ranked
    against. Some are true matches too (many captions fit several scenes); the
    listwise term then spreads their mass, which is what re-ranking needs.
    """

    model: BlipForImageTextRetrieval
    tokens: torch.Tensor  # (N, tokens, width): the locked tower's output for every training image
    count: int = 2
    top: int = EvalConfig.rerank_k  # the candidates `mcad eval` re-ranks

    def __post_init__(self) -> None:
        self.class_tokens = self.tokens[:, 0].contiguous()  # ITC reads only these; sliced once, not every step

    def for_batch(self, images: torch.Tensor) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
        """The miner for one batch: ``images`` are its own (excluded) image rows."""

        @torch.no_grad()
        def mine(text_feat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            image_feat = F.normalize(self.model.vision_proj(self.class_tokens), dim=-1)
            similarity = text_feat @ image_feat.t()
            similarity[torch.arange(len(images)), images] = float("-inf")
            candidates = similarity.topk(self.top, dim=1).indices  # (B, top)
            pick = torch.rand(candidates.shape, generator=generator).argsort(1)[:, : self.count]
            return self.tokens[candidates.gather(1, pick)]

        return mine


def _mix_uniform(weights: torch.Tensor, allowed: torch.Tensor, share: float) -> torch.Tensor:
    """Row-normalized ``weights`` mixed with a uniform distribution over ``allowed`` entries."""
    uniform = allowed.float() / allowed.sum(1, keepdim=True).clamp_min(1)
    return (1 - share) * weights / weights.sum(1, keepdim=True) + share * uniform + 1e-8


def recipe_losses(
    model: BlipForImageTextRetrieval,
    vision: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    same_image: torch.Tensor,
    generator: torch.Generator,
    recipe: BlipRecipe,
    mlm: MaskedWords | None = None,
    edits: CaptionEdits | None = None,
    split_negatives: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``blip_losses`` with ``recipe``'s loss settings: the one place the recipe meets its keyword arguments.

    ``mlm`` (made from ``recipe.mask_prob``), ``edits`` (on with ``recipe.edit_negatives``
    where the data names edit words) and the split-wide miner are built by the caller.
    """
    return blip_losses(
        model,
        vision,
        input_ids,
        attention_mask,
        same_image,
        generator,
        negatives=recipe.mined_negatives,
        listwise=recipe.listwise,
        mlm=mlm,
        random_negatives=recipe.random_negatives,
        edits=edits,
        uniform_share=recipe.uniform_share,
        split_negatives=split_negatives,
    )


def train_blip(
    model: BlipForImageTextRetrieval,
    pixels: Pixels,
    table: CaptionTable,
    recipe: BlipRecipe,
    seed: int,
    edits: CaptionEdits | None = None,
    mlm: MaskedWords | None = None,
) -> dict:
    """BLIP's losses (see ``blip_losses``) on ``recipe.schedule``; ``mlm``'s head trains alongside and is dropped.

    With ``recipe.freeze_vision`` the image tower does not train (LiT, Zhai et al.
    2022: a locked, already trained image tower): its tokens are computed once for
    the whole split and every step reads them from that table, so a step costs only
    the text and cross-attention passes. Each batch's captions are cut to their
    longest real length (padding is masked, so no output changes).

    ``recipe.split_negatives`` (needs ``freeze_vision``, which ``BlipRecipe`` checks)
    adds that many text-to-image negatives per text from the text's ITC top-k over
    the whole split (``SplitNegatives``). ``recipe.shape``, ``vision_init``,
    ``mask_prob`` and ``edit_negatives`` are the caller's: they shape ``model``,
    ``mlm`` and ``edits``.
    """
    miner = None
    if recipe.freeze_vision:
        model.vision_model.requires_grad_(False)
        tokens = image_tokens(model, pixels)
        miner = SplitNegatives(model, tokens, recipe.split_negatives) if recipe.split_negatives else None

        def vision_of(images: torch.Tensor) -> torch.Tensor:
            return tokens[images]
    else:

        def vision_of(images: torch.Tensor) -> torch.Tensor:
            return model.vision_model(pixel_values=pixels[images]).last_hidden_state

    def batch_loss(images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = table.sample(images, generator)
        mask = table.attention_mask[rows]
        length = int(mask.sum(1).max())
        same_image = images[:, None] == images[None, :]
        return recipe_losses(
            model,
            vision_of(images),
            table.input_ids[rows, :length],
            mask[:, :length],
            same_image,
            generator,
            recipe,
            mlm,
            edits,
            miner.for_batch(images) if miner is not None else None,
        )

    trained = torch.nn.ModuleDict({"blip": model, **({"mlm": mlm} if mlm is not None else {})})
    return _fit(trained, len(pixels), recipe.schedule, seed, "blip", batch_loss)


@torch.no_grad()
def image_tokens(model: BlipForImageTextRetrieval, pixels: Pixels, batch_size: int = 500) -> torch.Tensor:
    """The image tower's output tokens for every image, in eval mode (N, tokens, width)."""
    vision = model.vision_model
    was_training = vision.training
    vision.eval()
    table = None  # filled in place: a list of chunks and their concatenation would hold the table twice
    for start in tqdm(range(0, len(pixels), batch_size), desc="blip image tokens", mininterval=5.0):
        chunk = vision(pixel_values=pixels[start : start + batch_size]).last_hidden_state
        if table is None:
            table = chunk.new_empty((len(pixels), *chunk.shape[1:]))
        table[start : start + len(chunk)] = chunk
    vision.train(was_training)
    return table


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


@torch.no_grad()
def init_vision_from_clip(model: BlipForImageTextRetrieval, visual: torch.nn.Module) -> None:
    """Start BLIP's image tower from a trained open_clip ViT of the same shape, as METER and BLIP-2 start from CLIP.

    Both are pre-LayerNorm ViTs with fused q/k/v; the open_clip tower's ``ln_pre``
    has no place in BLIP's and is dropped, so this is an initialization (which
    training then adapts), not an exact copy. ``vision_proj`` starts from ``proj``.
    """
    vision = model.vision_model
    if tuple(vision.embeddings.position_embedding.shape[1:]) != tuple(visual.positional_embedding.shape) or len(
        vision.encoder.layers
    ) != len(visual.transformer.resblocks):
        raise ValueError("BLIP's image tower and the CLIP's differ in shape; they must match to initialize from it")
    emb = vision.embeddings
    emb.class_embedding.copy_(visual.class_embedding.view_as(emb.class_embedding))
    emb.position_embedding.copy_(visual.positional_embedding.view_as(emb.position_embedding))
    emb.patch_embedding.weight.copy_(visual.conv1.weight)
    emb.patch_embedding.bias.zero_()
    for layer, block in zip(vision.encoder.layers, visual.transformer.resblocks):
        pairs = [
            (layer.self_attn.qkv.weight, block.attn.in_proj_weight),
            (layer.self_attn.qkv.bias, block.attn.in_proj_bias),
            (layer.self_attn.projection.weight, block.attn.out_proj.weight),
            (layer.self_attn.projection.bias, block.attn.out_proj.bias),
            (layer.layer_norm1.weight, block.ln_1.weight),
            (layer.layer_norm1.bias, block.ln_1.bias),
            (layer.layer_norm2.weight, block.ln_2.weight),
            (layer.layer_norm2.bias, block.ln_2.bias),
            (layer.mlp.fc1.weight, block.mlp.c_fc.weight),
            (layer.mlp.fc1.bias, block.mlp.c_fc.bias),
            (layer.mlp.fc2.weight, block.mlp.c_proj.weight),
            (layer.mlp.fc2.bias, block.mlp.c_proj.bias),
        ]
        for target, source in pairs:
            target.copy_(source)
    vision.post_layernorm.weight.copy_(visual.ln_post.weight)
    vision.post_layernorm.bias.copy_(visual.ln_post.bias)
    if visual.proj is not None and tuple(model.vision_proj.weight.shape) == tuple(visual.proj.t().shape):
        model.vision_proj.weight.copy_(visual.proj.t())
        model.vision_proj.bias.zero_()


def build_blip(cfg: TeachersConfig, tokenizer, image_size: int) -> BlipForImageTextRetrieval:
    """A fresh BLIP ITM model of ``cfg.blip.shape`` for ``tokenizer``'s vocabulary, text tower at open_clip's scale."""
    tokens = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    shape = cfg.blip.shape
    model = BlipForImageTextRetrieval(blip_config(shape, image_size, len(tokenizer), cfg.context_length, tokens))
    init_text_tower(model)
    return model


def _loss_summary(history: dict[str, list[float]]) -> dict:
    """``first_loss``/``last_loss`` (mean of the last tenth) of the total, and ``terms`` the same for each term."""

    def ends(values: list[float]) -> dict:
        tail = values[-max(1, len(values) // 10) :]
        return {"first": values[0], "last": sum(tail) / len(tail)}

    total = ends(history["loss"])
    terms = {name: ends(values) for name, values in history.items() if name != "loss"}
    return {"first_loss": total["first"], "last_loss": total["last"], "steps": len(history["loss"]),
            **({"terms": terms} if terms else {})}


def train_teachers(cfg: TeachersConfig) -> dict:
    """Tokenizer, two CLIPs and a BLIP ITM, each saved in its hub layout under ``cfg.out_dir``.

    ``cfg.only`` names a subset to retrain; the others, the tokenizer and their
    entries in ``teachers.json`` are kept as they are (the tokenizer must exist).
    Returns (and writes to ``teachers.json``) where each teacher lives and how long it took.
    The BLIP recipe checked itself when it was made (``BlipRecipe``); the CLIPs' settings
    and those that join the two are checked here, before any data is read.
    """
    recipe = cfg.blip
    if not 1 <= cfg.clip_workers <= cfg.clip_schedule.batch_size:
        raise ValueError(f"clip_workers must be in [1, {cfg.clip_schedule.batch_size}], got {cfg.clip_workers}")
    check_shape("clip_a", cfg.clip_a)
    check_shape("clip_b", cfg.clip_b)
    check_schedule("clip", cfg.clip_schedule)
    unknown = set(cfg.only) - set(TEACHERS)
    if unknown:
        raise ValueError(f"unknown teachers {sorted(unknown)}; known: {list(TEACHERS)}")
    todo = [name for name in TEACHERS if not cfg.only or name in cfg.only]
    if recipe.freeze_vision and cfg.clip_ln_pre and "blip" in todo and recipe.vision_init in todo:
        raise ValueError("clip_ln_pre gives the CLIPs a LayerNorm BLIP's ViT lacks, so blip_freeze_vision "
                         "could not lock an exact copy: drop one of them")
    out = Path(cfg.out_dir)
    report: dict = load_report(out) if cfg.only else {}
    _check_kept_teachers(report, out, todo, cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    stats = ReadStats()
    shards = list_shards(Path(cfg.data_dir) / "train")
    image_size = cfg.image_size or common_image_size(shards, cfg.on_error)
    train = load_split(shards, image_size=image_size, policy=cfg.on_error, stats=stats)
    report.update({"config": cfg.to_dict(), "image_size": image_size, "n_train": len(train.keys),
                   "skipped": dict(stats.by_reason)})

    start = time.perf_counter()
    tokenizer_dir = out / "tokenizer"
    if not cfg.only:
        train_wordpiece((text for texts in train.captions for text in texts), tokenizer_dir, cfg.vocab_size)
        report["tokenizer"] = {"path": "tokenizer", "seconds": _since(start)}
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    report["tokenizer"]["vocab_size"] = len(tokenizer)
    _write_report(out, report)
    edits = None
    if "blip" in todo:  # resolved before the CLIPs train, so a world without edit words costs no wasted run
        edits, report["blip_edit_negatives"] = (edits_from_world(cfg.data_dir, tokenizer) if recipe.edit_negatives
                                                else (None, "off: --no-blip-edit-negatives"))
        (log.info if edits is not None or not recipe.edit_negatives else log.warning)(
            "BLIP edited negatives %s", report["blip_edit_negatives"])
    table = tokenize_captions(tokenizer, train.captions, cfg.context_length)
    pixels = NormalizedPixels(train.images)

    for offset, (name, shape) in enumerate((("clip_a", cfg.clip_a), ("clip_b", cfg.clip_b))):
        if name not in todo:
            continue
        start = time.perf_counter()
        torch.manual_seed(cfg.seed + offset)
        model_cfg = clip_model_cfg(shape, image_size, len(tokenizer), cfg.context_length, tokenizer.sep_token_id,
                                   no_ln_pre=not cfg.clip_ln_pre)
        model = build_clip(model_cfg, output_dict=True)
        summary = train_clip(model, pixels, table, cfg.clip_schedule, cfg.seed + offset, desc=name,
                             workers=cfg.clip_workers)
        spec = dual.save_local(model, model_cfg, clip_preprocess_cfg(image_size), tokenizer_dir, out / name)
        # Relative to the teachers directory (mcad_cache.teachers.specs.local_spec), so the directory can move.
        report[name] = {"spec": f"local-dir:{name}", "stream": "dual", **summary, "seconds": _since(start)}
        _write_report(out, report)  # each teacher is kept as it finishes: a later failure loses only the rest
        log.info("%s: %s", name, report[name])

    if "blip" in todo:
        start = time.perf_counter()
        torch.manual_seed(cfg.seed + 2)
        model = build_blip(cfg, tokenizer, image_size)
        if recipe.vision_init:
            source = dual.DualStreamTeacher.load(dual.DualTeacherSpec.local(out / recipe.vision_init))
            if recipe.freeze_vision and not isinstance(source.model.visual.ln_pre, torch.nn.Identity):
                raise ValueError(f"{recipe.vision_init} has an ln_pre that BLIP's ViT lacks, so a locked copy "
                                 "would not be the trained tower: train the CLIPs without clip_ln_pre")
            init_vision_from_clip(model, source.model.visual)
        mlm = masked_words_for(model, tokenizer, recipe.mask_prob) if recipe.mask_prob > 0 else None
        summary = train_blip(model, pixels, table, recipe, cfg.seed + 2, edits=edits, mlm=mlm)
        spec = blip.save_local(model, tokenizer_dir, image_size, IMAGE_MEAN, IMAGE_STD, out / "blip",
                                 itc_temperature=BLIP_TEMPERATURE)
        report["blip"] = {"spec": "blip", "stream": "single", "kind": spec.kind, **summary, "seconds": _since(start)}
        _write_report(out, report)
    return report


def common_image_size(shards: Sequence[str], policy: str, samples: int = 256) -> int:
    """The most common side of the first ``samples`` images (the longer side of a non-square one)."""
    sizes = Counter(max(sample.image.size) for sample in itertools.islice(iter_samples(shards, policy), samples))
    if not sizes:
        raise ValueError(f"no readable training sample in {shards[0]} ... ({len(shards)} shards)")
    return sizes.most_common(1)[0][0]


def _write_report(out: Path, report: dict) -> None:
    atomic_write_json(out / "teachers.json", report)


def _check_kept_teachers(report: dict, out: Path, todo: Sequence[str], cfg: TeachersConfig) -> None:
    """With ``--only``, the teachers that are not retrained must exist, checked before any training."""
    if not cfg.only:
        return
    needed = [name for name in TEACHERS if name not in todo]  # blip.vision_init is one of them or retrained
    if "tokenizer" not in report or not (out / "tokenizer").is_dir():
        raise FileNotFoundError(f"{out} has no tokenizer: run `mcad teachers` without --only first")
    missing = [name for name in needed if name not in report or not (out / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"--only {' '.join(todo)} keeps {', '.join(missing)}, which {out} does not hold "
                                f"(teachers.json lists {sorted(k for k in report if k in TEACHERS)}): "
                                "add them to --only or run without --only")


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)
