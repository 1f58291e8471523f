"""Dual-stream teachers: any open_clip model, from the hub or from a local directory.

A teacher is named the way open_clip names models, so the code path for a toy
teacher trained here and for `ViT-L-14` / `laion2b_s32b_b82k` is the same:

- ``DualTeacherSpec("ViT-B-16", "openai")``: a built-in config plus a pretrained tag;
- ``DualTeacherSpec("hf-hub:org/repo")``: an open_clip repo on the Hugging Face hub;
- ``DualTeacherSpec("local-dir:/path")``: the same layout saved on disk
  (``open_clip_config.json`` + ``open_clip_model.safetensors`` + tokenizer files),
  which is what :func:`save_local` writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mcad_core.atomic import atomic_dir
from mcad_core.views import normalize_uint8, square_size
from mcad_cache.teachers.available import check_teachers, hub_access
from mcad_cache.teachers.identity import TeacherIdentity, state_dict_sha256

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


@dataclass(frozen=True)
class DualTeacherSpec:
    name: str
    pretrained: str | None = None

    @classmethod
    def local(cls, path: str | Path) -> "DualTeacherSpec":
        return cls(f"local-dir:{Path(path).resolve()}")


class DualStreamTeacher(torch.nn.Module):
    """An open_clip model with its own preprocessing, tokenizer and normalization constants.

    ``encode_images`` / ``encode_texts`` return L2-normalized embeddings, so a
    similarity is a dot product and ``logit_scale`` turns it into a logit.
    """

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, spec: DualTeacherSpec):
        super().__init__()
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.spec = spec
        cfg = model.visual.preprocess_cfg
        self.image_size = square_size(cfg["size"])
        # On the model's device (``load`` put it there): inputs are moved to ``mean.device`` before a forward.
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, spec: DualTeacherSpec, device: str | torch.device = "cpu") -> "DualStreamTeacher":
        """Load ``spec``; one this machine cannot load is a ``TeacherUnavailableError`` (teachers/available.py)."""
        with hub_access(check_teachers(duals=[spec])):
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=spec.pretrained, device=device
            )
            tokenizer = open_clip.get_tokenizer(spec.name)
        return cls(model, preprocess, tokenizer, spec)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if _has_text_projection(self.model) else int(
            self.model.visual.output_dim
        )

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def identity(self) -> TeacherIdentity:
        return TeacherIdentity("dual", self.spec.name, self.spec.pretrained, state_dict_sha256(self.model))

    def pixels_from_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's own evaluation transform, batched."""
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    def pixels_from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Fast path for uint8 N x 3 x H x W batches already at the model's input size."""
        return normalize_uint8(images, self.mean, self.std, self.image_size)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels.to(self.mean.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return F.normalize(self.model.encode_text(tokens.to(self.mean.device)).float(), dim=-1)


def _has_text_projection(model: torch.nn.Module) -> bool:
    projection = getattr(model, "text_projection", None)
    return isinstance(projection, torch.Tensor | torch.nn.Parameter)


def save_local(
    model: torch.nn.Module,
    model_cfg: dict,
    preprocess_cfg: dict,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
) -> DualTeacherSpec:
    """Save an open_clip model in the hub layout, loadable with ``local-dir:OUT_DIR``.

    Written atomically, so a crash never leaves a half-written teacher that later loads.
    """
    from transformers import AutoTokenizer

    with atomic_dir(out_dir) as tmp_dir:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp_dir))
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
        (tmp_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp_dir / OPEN_CLIP_WEIGHTS))
    return DualTeacherSpec.local(out_dir)
