"""The built-in single-stream teacher kind: BLIP image-text matching (`BlipForImageTextRetrieval`).

Loaded with ``from_pretrained`` from a hub id (``Salesforce/blip-itm-base-coco``)
or a local directory holding the same files, which is what the default world's
teacher training writes. The model is used through its own submodules so that
the image tower runs once per image, however many texts it is paired with:

- ``vision_tokens``: the ViT token sequence, computed once per image;
- ``itc_images`` / ``itc_texts``: the contrastive (ITC) embeddings, normalized;
- ``itm``: ITM logits and the fused (cross-attended) pair feature for any list
  of (image row, text row) pairs, batched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipForImageTextRetrieval, BlipProcessor

from mcad_cache.teachers.available import check_teachers, hub_access
from mcad_cache.teachers.identity import TeacherIdentity, state_dict_sha256
from mcad_cache.teachers.single import ItmOutput, SingleTeacherSpec, TextBatch
from mcad_core.atomic import atomic_dir
from mcad_core.views import normalize_uint8


LENGTH_GROUPS = 4  # fused passes run in this many groups of similar caption length (fused_states_by_length)


class BlipItmTeacher(torch.nn.Module):
    """The built-in ``blip`` kind of ``SingleStreamTeacher``."""

    def __init__(self, model: BlipForImageTextRetrieval, processor: BlipProcessor, spec: SingleTeacherSpec):
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.spec = spec
        self.context_length = int(model.config.text_config.max_position_embeddings)
        image_processor = processor.image_processor
        self.image_size = int(image_processor.size["height"])
        # On the model's device (``load`` put it there): inputs are moved to ``mean.device`` before a forward.
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1),
                             persistent=False)

    @classmethod
    def load(cls, spec: SingleTeacherSpec, device: str | torch.device = "cpu") -> "BlipItmTeacher":
        # float32 whatever the weights were saved in (transformers would keep a float16 file's dtype):
        # reduced precision is autocast's job, and the shipped default teachers are stored in float16.
        # One this machine cannot load is a TeacherUnavailableError first (mcad_cache/teachers/available.py).
        with hub_access(check_teachers(singles=[spec])):
            model = BlipForImageTextRetrieval.from_pretrained(spec.name, dtype=torch.float32).to(device)
            processor = BlipProcessor.from_pretrained(spec.name)
        return cls(model, processor, spec)

    def identity(self) -> TeacherIdentity:
        return TeacherIdentity("single", _display_name(self.spec.name), None, state_dict_sha256(self.model))

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.image_text_hidden_size)

    @property
    def itc_temperature(self) -> float:
        """The temperature ITC was trained at, which turns a cosine into an ITC logit.

        Teachers trained here store it in their config (``itc_temperature``).
        Hub BLIP checkpoints do not; for them it is 1, so ITM + ITC is the raw
        ITM logit plus cosine, as BLIP's own retrieval evaluation adds them.
        """
        return float(getattr(self.model.config, "itc_temperature", 1.0))

    @property
    def fused_dim(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    def pixels_from_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = self.processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
        return batch["pixel_values"]

    def pixels_from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_uint8(images, self.mean, self.std, self.image_size)

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        encoded = self.processor.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return TextBatch(encoded["input_ids"], encoded["attention_mask"])

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels.to(self.mean.device)).last_hidden_state

    def itc_images(self, tokens: torch.Tensor) -> torch.Tensor:
        # .float(): under autocast the projection is bfloat16/float16; the norm is taken in float32
        return F.normalize(self.model.vision_proj(tokens[:, 0, :]).float(), dim=-1)

    def text_states(self, text: TextBatch) -> torch.Tensor:
        return self.model.text_encoder(
            input_ids=text.input_ids.to(self.mean.device),
            attention_mask=text.attention_mask.to(self.mean.device),
        ).last_hidden_state

    def itc_texts(self, text: TextBatch) -> torch.Tensor:
        """ITC text embeddings, the batch cut to its longest caption first (``cut_padding``)."""
        return F.normalize(self.model.text_proj(self.text_states(cut_padding(text))[:, 0, :]).float(), dim=-1)

    def itm(self, image_tokens: torch.Tensor, text: TextBatch, image_rows: torch.Tensor | None = None) -> ItmOutput:
        """Score aligned pairs: row i of ``image_tokens`` (or row ``image_rows[i]``) with row i of ``text``.

        With ``image_rows`` an image paired with several texts has its cross-attention
        keys and values computed once (see ``fused_states``).
        """
        images = image_tokens.shape[0] if image_rows is None else len(image_rows)
        if images != len(text):
            raise ValueError(f"{images} images for {len(text)} texts: ITM scores aligned pairs")
        device = self.mean.device
        states = fused_states_by_length(
            self.model,
            text.input_ids.to(device),
            text.attention_mask.to(device),
            image_tokens.to(device),
            None if image_rows is None else image_rows.to(device),
        )
        fused = states[:, 0, :]
        two_way = self.model.itm_head(fused)
        return ItmOutput(logits=two_way[:, 1] - two_way[:, 0], fused=fused)


def cut_padding(text: TextBatch) -> TextBatch:
    """``text`` without its trailing columns that no caption uses (all masked).

    ``tokenize`` pads every caption to the model's 512 positions, and the text encoder's cost grows with the
    padded width; masked positions are never attended to and the [CLS] state does not depend on them, so
    the result is the same up to float rounding. Only all-padding columns at the end go, whatever side the
    tokenizer pads on.
    """
    used = text.attention_mask.any(0).nonzero()
    width = int(used.max()) + 1 if len(used) else text.input_ids.shape[1]  # no token at all: left as it is
    if width == text.input_ids.shape[1]:
        return text
    return TextBatch(text.input_ids[:, :width], text.attention_mask[:, :width])


def fused_states(
    model: BlipForImageTextRetrieval,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    image_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The text encoder's hidden states with cross-attention to every image token (BLIP's multimodal mode).

    Row i of the text is paired with row i of ``image_tokens``, or, given ``image_rows``,
    with row ``image_rows[i]``: then each image's cross-attention keys and values are
    computed once, however many texts it is paired with, and gathered per pair
    (re-ranking pairs each image with k texts). The result is the same up to float rounding.
    """
    if image_rows is None:
        return _multimodal(model, input_ids, attention_mask, image_tokens)
    return _fused_runs(model, input_ids, attention_mask, image_tokens, image_rows, [torch.arange(len(input_ids))],
                       cut=False)


def fused_states_by_length(
    model: BlipForImageTextRetrieval,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    image_rows: torch.Tensor | None = None,
    groups: int = LENGTH_GROUPS,
) -> torch.Tensor:
    """``fused_states`` in ``groups`` runs of similar caption length, each cut to its longest caption.

    Padding is masked, so every real token's state is unchanged; the fused pass's cost
    grows with the padded length, and the default world's captions are 13 tokens on
    average against 19 at most. States at padding positions mean nothing (zeros past a group's cut).
    With ``image_rows`` the images' cross-attention keys and values are projected once
    for all the groups (``_KeysValuesPerImage``).
    """
    lengths = attention_mask.sum(1)
    order = lengths.argsort(stable=True)
    runs = order.tensor_split(min(groups, len(order)))
    states = _fused_runs(model, input_ids, attention_mask, image_tokens, image_rows, runs, cut=True)
    return states.index_select(0, order.argsort())


def _fused_runs(
    model: BlipForImageTextRetrieval,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    image_rows: torch.Tensor | None,
    runs: Sequence[torch.Tensor],
    cut: bool,
) -> torch.Tensor:
    """The fused states of the pairs in ``runs`` (row index tensors), concatenated in run order.

    With ``cut`` each run's captions are cut to its longest real length (zeros past it).
    """
    if image_rows is not None and len(image_rows) != len(input_ids):
        raise ValueError(f"{len(image_rows)} image rows for {len(input_ids)} texts")
    lengths = attention_mask.sum(1)
    parts = []
    with contextlib.ExitStack() as stack:
        if image_rows is not None:
            used, image_rows = torch.unique(image_rows, return_inverse=True)  # project only the images pairs use
            shared = stack.enter_context(_KeysValuesPerImage(model, image_tokens.index_select(0, used)))
        for run in runs:
            width = int(lengths[run].max()) if cut else input_ids.shape[1]
            ids, mask = input_ids.index_select(0, run)[:, :width], attention_mask.index_select(0, run)[:, :width]
            if image_rows is None:
                states = _multimodal(model, ids, mask, image_tokens.index_select(0, run))
            else:
                states = _multimodal(model, ids, mask, shared.pairs(image_rows.index_select(0, run)))
            parts.append(F.pad(states, (0, 0, 0, input_ids.shape[1] - width)))
    return torch.cat(parts)


def _multimodal(model, input_ids, attention_mask, image_tokens):
    return model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_tokens,
        encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device),
    ).last_hidden_state


class _KeysValuesPerImage:
    """Inside: every cross-attention key/value projection projects ``image_tokens`` once and gathers pair rows.

    The layers are HF's own; only the two ``Linear`` calls of each cross-attention
    are redirected (an instance ``forward``, removed on exit). Each projection of the
    distinct images is computed on its first call and reused by every later pass in
    the context (the length groups of one fused pass), which gathers its pairs' rows
    from it: ``linear(image_tokens)[rows]`` is the projection of ``image_tokens[rows]``.
    ``pairs(rows)`` sets the rows of the next pass and returns its stand-in
    ``encoder_hidden_states``: a view of the right shape that the redirected
    projections do not read (so no copy of the image tokens per pair is made).
    """

    def __init__(self, model: BlipForImageTextRetrieval, image_tokens: torch.Tensor):
        self.projections: list[torch.nn.Linear] = []
        for layer in model.text_encoder.encoder.layer:
            attention = getattr(getattr(layer, "crossattention", None), "self", None)
            if not isinstance(getattr(attention, "key", None), torch.nn.Linear) or not isinstance(
                getattr(attention, "value", None), torch.nn.Linear
            ):
                raise TypeError(
                    "this transformers version's BLIP text layers have no crossattention.self.key/value Linear; "
                    "fused_states(image_rows=...) needs them"
                )
            self.projections += [attention.key, attention.value]
        self.image_tokens = image_tokens
        self.projected: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None

    def pairs(self, rows: torch.Tensor) -> torch.Tensor:
        self.rows = rows
        return self.image_tokens[:1].expand(len(rows), -1, -1)

    def _gathered(self, projection: torch.nn.Linear, pair_tokens: torch.Tensor) -> torch.Tensor:
        if self.rows is None or pair_tokens.shape[0] != len(self.rows):
            expected = "no pairs set" if self.rows is None else f"the {len(self.rows)} pairs"
            raise RuntimeError(f"cross-attention got {pair_tokens.shape[0]} rows, expected {expected}")
        key = id(projection)
        if key not in self.projected:
            self.projected[key] = F.linear(self.image_tokens, projection.weight, projection.bias)
        return _GatherRows.apply(self.projected[key], self.rows)

    def __enter__(self) -> "_KeysValuesPerImage":
        for projection in self.projections:
            projection.forward = partial(self._gathered, projection)
        return self

    def __exit__(self, *exc) -> None:
        for projection in self.projections:
            del projection.forward
        self.projected.clear()


class _GatherRows(torch.autograd.Function):
    """``source.index_select(0, rows)`` whose backward sums the rows' gradients with one ``index_add_``.

    Autograd's own backward of ``index_select`` scatters the gradient element by
    element; the cross-attention hands it a permuted (non-contiguous) gradient,
    for which one contiguous copy and a row-wise ``index_add_`` are several times faster.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.source_rows = source.shape[0]
        return source.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        summed = grad.new_zeros((ctx.source_rows, *grad.shape[1:])).index_add_(0, rows, grad.contiguous())
        return summed, None


def _display_name(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def save_local(
    model: BlipForImageTextRetrieval,
    tokenizer_dir: str | Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: str | Path,
    itc_temperature: float | None = None,
) -> SingleTeacherSpec:
    """Save in the hub layout (``save_pretrained`` of model and processor), atomically.

    ``itc_temperature``, when given, is stored in the model config for ``SingleStreamTeacher.itc_temperature``.
    """
    from transformers import AutoTokenizer, BlipImageProcessor

    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=list(mean), image_std=list(std)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if itc_temperature is not None:
        model.config.itc_temperature = itc_temperature
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return SingleTeacherSpec(str(Path(out_dir).resolve()))
