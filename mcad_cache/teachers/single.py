"""The single-stream teacher protocol: what stage 1 (and the online baseline) asks of a cross-encoder.

A single-stream teacher reads an image and a caption together (ALBEF, BLIP, a BLIP-2
ITM head, any re-ranker). Stage 1 needs five things of it, and nothing else:

- ``vision_tokens(pixels)``: the image side, computed once per image;
- ``itc_images(tokens)`` / ``itc_texts(text)``: its contrastive embeddings, L2-normalized;
- ``itm(tokens, text, image_rows)``: the match logit of each (image row, text row) pair,
  batched, and the fused pair feature its head reads;
- ``tokenize`` / ``pixels_from_uint8``: its own input preparation.

A kind is one class that implements ``SingleStreamTeacher`` plus one
``register_single_kind`` call; the spec ``KIND:NAME`` (``--single`` on the
command line, ``"kind"`` in teachers.json) picks it. A bare ``NAME`` is the
built-in ``blip`` kind (``BlipForImageTextRetrieval``, mcad_cache/teachers/blip.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from mcad_cache.teachers.identity import TeacherIdentity

DEFAULT_KIND = "blip"


@dataclass(frozen=True)
class SingleTeacherSpec:
    name: str  # hub id or local directory, as the kind's loader reads it
    kind: str = DEFAULT_KIND

    def __str__(self) -> str:
        return self.name if self.kind == DEFAULT_KIND else f"{self.kind}:{self.name}"


@dataclass
class TextBatch:
    """Token ids and attention mask of a list of captions (row-aligned)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> "TextBatch":
        return TextBatch(self.input_ids[rows], self.attention_mask[rows])


@dataclass
class ItmOutput:
    logits: torch.Tensor  # (P,) match-minus-no-match logit, the pair's ITM score
    fused: torch.Tensor  # (P, fused_dim) the multimodal feature the ITM head reads


@runtime_checkable
class SingleStreamTeacher(Protocol):
    spec: SingleTeacherSpec
    image_size: int  # square input side; pixels_from_uint8 takes images rendered at this size

    @property
    def embed_dim(self) -> int: ...  # width of the ITC embeddings

    @property
    def fused_dim(self) -> int: ...  # width of ItmOutput.fused

    @property
    def itc_temperature(self) -> float: ...  # turns an ITC cosine into a logit (1: the raw cosine)

    def identity(self) -> TeacherIdentity: ...

    def parameters(self): ...  # torch.nn.Module's; `mcad eval` reports the count

    def pixels_from_uint8(self, images: torch.Tensor) -> torch.Tensor: ...

    def tokenize(self, texts: Sequence[str]) -> TextBatch: ...

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def itc_images(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def itc_texts(self, text: TextBatch) -> torch.Tensor: ...

    def itm(self, image_tokens: torch.Tensor, text: TextBatch, image_rows: torch.Tensor | None = None) -> ItmOutput:
        """Row i of ``text`` with row i of ``image_tokens`` (or row ``image_rows[i]``)."""
        ...


Loader = Callable[[SingleTeacherSpec, "str | torch.device"], SingleStreamTeacher]

# kind -> loader, or "module:attribute" of a loader imported on first use (so listing kinds loads no model code)
_KINDS: dict[str, Loader | str] = {"blip": "mcad_cache.teachers.blip:BlipItmTeacher.load"}


class UnknownTeacherKindError(ValueError):
    """A single-stream spec names a kind no loader is registered for."""


def register_single_kind(kind: str, loader: Loader) -> None:
    """Make ``KIND:NAME`` specs load with ``loader(spec, device)``; a kind is registered once."""
    if not kind.isidentifier():
        raise ValueError(f"a teacher kind is an identifier, got {kind!r}")
    if kind in _KINDS and _KINDS[kind] is not loader:
        raise ValueError(f"single-stream teacher kind {kind!r} is already registered")
    _KINDS[kind] = loader


def single_kinds() -> list[str]:
    return sorted(_KINDS)


def parse_single(text: str) -> SingleTeacherSpec:
    """'Salesforce/blip-itm-base-coco' or a directory -> blip; 'KIND:NAME' -> that kind."""
    kind, sep, name = text.partition(":")
    if sep and kind in _KINDS:
        return SingleTeacherSpec(name, kind)
    return SingleTeacherSpec(text)


def load_single(spec: SingleTeacherSpec, device: str | torch.device = "cpu") -> SingleStreamTeacher:
    if spec.kind not in _KINDS:
        raise UnknownTeacherKindError(f"no single-stream teacher kind {spec.kind!r}; known: {single_kinds()}")
    loader = _KINDS[spec.kind]
    if isinstance(loader, str):
        module, _, attribute = loader.partition(":")
        target = importlib.import_module(module)
        for part in attribute.split("."):
            target = getattr(target, part)
        loader = _KINDS[spec.kind] = target
    teacher = loader(spec, device)
    if not isinstance(teacher, SingleStreamTeacher):
        raise TypeError(f"the {spec.kind!r} loader returned {type(teacher).__name__}, not a SingleStreamTeacher")
    return teacher
