"""The stage-2 student: an ordinary open_clip model (timm image tower + Hugging Face BERT text tower).

The student is built *through* open_clip from a custom model config, and saved in
open_clip's ``local-dir:`` layout, so whoever receives it needs nothing from this
project::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/student")
    tokenizer = open_clip.get_tokenizer("local-dir:/path/to/student")

Layout written by :func:`save_student`::

    open_clip_config.json        model_cfg + preprocess_cfg (what open_clip reads)
    open_clip_model.safetensors  the whole CustomTextCLIP state dict
    tokenizer files              at the top level: open_clip's ``get_tokenizer("local-dir:D")`` reads D itself
    text/config.json             the BertConfig that ``text_cfg.hf_model_name`` names
    heads.safetensors            the feature heads (fd / ia), not part of the open_clip model
    student.json                 the StudentConfig it was built from

open_clip quirk: ``text_cfg.hf_model_name`` goes straight to ``AutoConfig.from_pretrained``,
so a relative path would resolve against the *process's* working directory, not the
checkpoint directory. The config therefore holds the absolute path of ``text/`` at save
time. After moving the directory, :func:`load_student` still works (it points the text
tower at the bundled ``text/`` itself), and :func:`relocate_student` rewrites the paths so
plain ``open_clip.create_model_and_transforms`` works again.

Pretrained weights (nothing is downloaded by default: this project runs offline):

- text: ``StudentConfig.text_model`` names a hub id (e.g. ``huawei-noah/TinyBERT_General_4L_312D``)
  or a local directory saved with ``save_pretrained``; its config decides the tower's shape.
  The tokenizer passed to :func:`build_student` must then be that model's tokenizer.
- image: ``StudentConfig.image_pretrained`` is ``None`` (random init), ``"timm"`` (timm's own
  pretrained weights for ``image_model``; a tag picks them, e.g. ``mobilevitv2_050.cvnets_in1k``;
  needs the hub or a filled HF cache) or the path of a timm state-dict file for ``image_model``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mcad_core.atomic import atomic_dir, atomic_write_json
from mcad_core.views import normalize_uint8, square_size

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HEADS_WEIGHTS = "heads.safetensors"
STUDENT_CONFIG = "student.json"
TEXT_DIR = "text"
LOCAL_DIR = "local-dir:"
TEXT_POOLER = "mean_pooler"  # averages real tokens only (mask from pad id); no BERT pooler weights to rely on


VIT = "vit"  # ``image_model`` naming open_clip's own VisionTransformer, shaped by the ``image_*`` fields


@dataclass(frozen=True)
class StudentConfig:
    # "vit": open_clip's own ViT (the ``image_*`` fields below); else a timm model name (a ".tag" suffix picks
    # timm pretrained weights), e.g. "mobilevitv2_050" for runs that start from pretrained weights.
    image_model: str = "mobilevitv2_050"
    image_size: int = 64
    image_width: int = 128  # the "vit" tower only
    image_layers: int = 4
    image_heads: int = 4
    image_patch: int = 8
    image_mlp_ratio: float = 2.0
    text_model: str | None = None  # hub id or local dir of pretrained TinyBERT weights; None = random init
    text_layers: int = 4
    text_width: int = 312
    text_heads: int = 12
    text_intermediate: int = 1200
    embed_dim: int = 256
    context_length: int = 24
    feature_dims: tuple[int, ...] = ()  # widths of the teacher feature spaces the feature heads project to (fd/ia)
    image_pretrained: str | None = None  # None: random init; "timm": timm's weights; or a timm state-dict file
    # Dropout of a from-scratch text tower (BERT's default is 0.1). 0 by default: short from-scratch
    # schedules gain nothing from it, and without it ranks under torchrun compute exactly what one process
    # would. A pretrained ``text_model`` keeps the dropout of its own config.
    text_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.image_model != VIT:
            return
        if self.image_width % self.image_heads or self.image_size % self.image_patch:
            raise ValueError(f"the ViT student needs image_width ({self.image_width}) a multiple of image_heads "
                             f"({self.image_heads}) and image_size ({self.image_size}) of image_patch "
                             f"({self.image_patch})")
        if self.image_pretrained is not None:
            raise ValueError("image_pretrained applies to timm image towers; the 'vit' student starts from random "
                             "init")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["feature_dims"] = list(self.feature_dims)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> StudentConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown StudentConfig fields {sorted(unknown)}")
        data = dict(data)
        if "feature_dims" in data:
            data["feature_dims"] = tuple(int(d) for d in data["feature_dims"])
        return cls(**data)


# Named students. "vit": open_clip's ViT + a small BERT, together no larger than the default world's largest
# CLIP teacher (clip_a, 1.14M); trains from scratch. "mobilevit": MobileViTv2-050 + a TinyBERT-size text tower
# (5.9M), the preset for runs that start from pretrained weights (timm's and TinyBERT's).
STUDENT_PRESETS: dict[str, StudentConfig] = {
    "vit": StudentConfig(image_model=VIT, image_width=128, image_layers=4, image_heads=4, image_patch=8,
                         image_mlp_ratio=2.0, text_layers=3, text_width=128, text_heads=4, text_intermediate=256,
                         embed_dim=128),
    "mobilevit": StudentConfig(image_model="mobilevitv2_050"),
}


class Student(nn.Module):
    """An open_clip ``CustomTextCLIP`` (``.clip``) plus linear feature heads (``.heads``).

    The heads map the student's *unnormalized* embedding into each teacher's feature
    space, so feature distillation (fd) and interactive alignment (ia) can compare the
    student with teachers of other widths; they stay out of the open_clip model because
    they are a training device, not part of the exported retrieval model.
    """

    def __init__(
        self,
        clip: nn.Module,
        config: StudentConfig,
        model_cfg: dict,
        preprocess_cfg: dict,
        preprocess=None,
    ):
        super().__init__()
        self.clip = clip
        self.config = config
        self.model_cfg = json.loads(json.dumps(model_cfg))  # a private, JSON-clean copy
        self.preprocess_cfg = json.loads(json.dumps(preprocess_cfg))
        self.preprocess = preprocess  # open_clip's eval transform for PIL images
        self.heads = nn.ModuleList(nn.Linear(config.embed_dim, d) for d in config.feature_dims)
        self.image_size = square_size(preprocess_cfg["size"])
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def context_length(self) -> int:
        """Token ids per caption, as open_clip's tokenizer pads them (``clip.context_length`` is BERT's positions)."""
        return int(self.model_cfg["text_cfg"]["context_length"])

    def pixels_from_uint8(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) at the model's input size -> normalized float pixels, on the model's device."""
        return normalize_uint8(images, self.mean, self.std, self.image_size)

    def encode_image_raw(self, pixels: Tensor) -> Tensor:
        return self.clip.encode_image(pixels, normalize=False)

    def encode_text_raw(self, input_ids: Tensor) -> Tensor:
        return self.clip.encode_text(input_ids, normalize=False)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, embed_dim), L2-normalized."""
        return F.normalize(self.encode_image_raw(pixels), dim=-1)

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """(B, embed_dim), L2-normalized; open_clip masks positions equal to the BERT config's pad id (0)."""
        return F.normalize(self.encode_text_raw(input_ids), dim=-1)

    def forward(self, pixels: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        image_raw = self.encode_image_raw(pixels)
        text_raw = self.encode_text_raw(input_ids)
        return {
            "image": F.normalize(image_raw, dim=-1),
            "text": F.normalize(text_raw, dim=-1),
            "image_raw": image_raw,
            "text_raw": text_raw,
            "logit_scale": self.clip.logit_scale.exp(),
        }

    def project(self, raw: Tensor, head: int) -> Tensor:
        """The student's raw embedding in teacher feature space ``head`` (index into ``feature_dims``)."""
        return self.heads[head](raw)


def build_student(cfg: StudentConfig, tokenizer_dir: str | Path, work_dir: str | Path) -> Student:
    """A fresh student, built through ``open_clip.create_model_and_transforms("local-dir:...")``.

    open_clip only builds HF text towers from a path or hub id, so the BertConfig (and the
    pretrained weights, when ``cfg.text_model`` is given) is written to ``work_dir/text`` and a
    weightless open_clip config to ``work_dir/open_clip``; both are owned (and replaced) here.
    The same loader then reads exported students, so building and loading share one code path.
    """
    from transformers import AutoModel, AutoTokenizer, BertConfig

    tokenizer_dir = Path(tokenizer_dir).resolve()
    work_dir = Path(work_dir).resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no pad token; open_clip masks text by the pad id")
    text_dir, clip_dir = work_dir / TEXT_DIR, work_dir / "open_clip"
    for directory in (text_dir, clip_dir):
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)

    if cfg.text_model is None:
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            intermediate_size=cfg.text_intermediate,
            max_position_embeddings=max(cfg.context_length, 32),
            pad_token_id=tokenizer.pad_token_id,
            hidden_dropout_prob=cfg.text_dropout,
            attention_probs_dropout_prob=cfg.text_dropout,
        ).save_pretrained(str(text_dir))
    else:
        text = AutoModel.from_pretrained(cfg.text_model)
        _check_pretrained_text(text.config, tokenizer, cfg)
        text.save_pretrained(str(text_dir))
        del text

    model_cfg = student_model_cfg(cfg, text_dir, tokenizer_dir)
    preprocess_cfg = student_preprocess_cfg(cfg)
    (clip_dir / OPEN_CLIP_CONFIG).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    clip, _, preprocess = open_clip.create_model_and_transforms(
        LOCAL_DIR + str(clip_dir),
        pretrained_image=cfg.image_pretrained == "timm",
        pretrained_text=cfg.text_model is not None,
    )
    if cfg.image_pretrained not in (None, "timm"):
        _load_timm_trunk(clip.visual.trunk, cfg.image_pretrained)
    if preprocess_cfg != _jsonable(clip.visual.preprocess_cfg):
        # open_clip recomputes ``size`` from the tower; a mismatch means the config is not what we meant.
        raise RuntimeError(f"open_clip changed the preprocess config: {clip.visual.preprocess_cfg}")
    return Student(clip, cfg, model_cfg, preprocess_cfg, preprocess)


def student_model_cfg(cfg: StudentConfig, text_dir: str | Path, tokenizer_dir: str | Path) -> dict:
    """The open_clip custom model config (a ``CustomTextCLIP``: open_clip ViT or timm image tower + HF text tower)."""
    if cfg.image_model == VIT:
        vision_cfg = {"image_size": cfg.image_size, "patch_size": cfg.image_patch, "width": cfg.image_width,
                      "layers": cfg.image_layers, "head_width": cfg.image_width // cfg.image_heads,
                      "mlp_ratio": cfg.image_mlp_ratio}
    else:
        vision_cfg = {"image_size": cfg.image_size, "timm_model_name": cfg.image_model, "timm_pool": "avg",
                      "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0}
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "hf_model_name": str(Path(text_dir).resolve()),
            "hf_tokenizer_name": str(Path(tokenizer_dir).resolve()),
            "hf_proj_type": "linear",
            "hf_pooler_type": TEXT_POOLER,
            "context_length": cfg.context_length,
        },
    }


def student_preprocess_cfg(cfg: StudentConfig) -> dict:
    """Pixel normalization: the teachers' CLIP constants, or timm's own when its pretrained weights are used."""
    mean, std = list(OPENAI_DATASET_MEAN), list(OPENAI_DATASET_STD)
    if cfg.image_pretrained is not None and cfg.image_model != VIT:
        import timm

        pretrained = timm.models.get_pretrained_cfg(cfg.image_model)
        if pretrained is not None:
            mean, std = list(pretrained.mean), list(pretrained.std)
    return {
        "size": [cfg.image_size, cfg.image_size],
        "mode": "RGB",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def save_student(student: Student, tokenizer_dir: str | Path, out_dir: str | Path) -> str:
    """Write ``student`` as an open_clip ``local-dir`` checkpoint (plus heads); returns ``"local-dir:<abs out_dir>"``.

    Everything the checkpoint needs is copied inside ``out_dir``. Built in a scratch
    directory next to ``out_dir``, fsynced, then renamed over it, so a crash never leaves
    a half-written student that later loads.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir).resolve()
    model_cfg = json.loads(json.dumps(student.model_cfg))
    _point_at(model_cfg, out_dir)
    with atomic_dir(out_dir) as tmp:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
        student.clip.text.config.save_pretrained(str(tmp / TEXT_DIR))
        config = {"model_cfg": model_cfg, "preprocess_cfg": student.preprocess_cfg}
        (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(_cpu_state(student.clip), str(tmp / OPEN_CLIP_WEIGHTS))
        save_file(_cpu_state(student.heads), str(tmp / HEADS_WEIGHTS))
        (tmp / STUDENT_CONFIG).write_text(json.dumps(student.config.to_dict(), indent=2))
    return LOCAL_DIR + str(out_dir)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """Load a saved student through ``open_clip.create_model_and_transforms("local-dir:PATH")``, then its heads.

    The text tower is pointed at the bundled ``PATH/text`` (open_clip's ``text_cfg`` kwarg
    override), so a directory that was moved or copied since it was saved still loads.
    """
    path = Path(str(path).removeprefix(LOCAL_DIR)).resolve()
    saved = json.loads((path / OPEN_CLIP_CONFIG).read_text())
    config = StudentConfig.from_dict(json.loads((path / STUDENT_CONFIG).read_text()))
    model_cfg = saved["model_cfg"]
    _point_at(model_cfg, path)
    # The whole text_cfg is replaced, so say explicitly that the weights come from the checkpoint.
    text_cfg = dict(model_cfg["text_cfg"], hf_model_pretrained=False)
    clip, _, preprocess = open_clip.create_model_and_transforms(
        LOCAL_DIR + str(path), device=device, text_cfg=text_cfg
    )
    student = Student(clip, config, model_cfg, saved["preprocess_cfg"], preprocess)
    student.heads.load_state_dict(load_file(str(path / HEADS_WEIGHTS)), strict=True)
    return student.to(device)


def relocate_student(path: str | Path) -> str:
    """Rewrite the absolute paths in ``PATH/open_clip_config.json`` after a move, so that plain
    ``open_clip.create_model_and_transforms("local-dir:PATH")`` loads again; returns the spec."""
    path = Path(str(path).removeprefix(LOCAL_DIR)).resolve()
    config = json.loads((path / OPEN_CLIP_CONFIG).read_text())
    _point_at(config["model_cfg"], path)
    atomic_write_json(path / OPEN_CLIP_CONFIG, config)
    return LOCAL_DIR + str(path)


def _point_at(model_cfg: dict, directory: Path) -> None:
    model_cfg["text_cfg"]["hf_model_name"] = str(directory / TEXT_DIR)
    model_cfg["text_cfg"]["hf_tokenizer_name"] = str(directory)


def _check_pretrained_text(config, tokenizer, cfg: StudentConfig) -> None:
    """A pretrained text tower must read the given tokenizer's ids and mask its padding."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, {cfg.text_model} only {config.vocab_size}")
    if config.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(
            f"{cfg.text_model} pads with id {config.pad_token_id}, the tokenizer with {tokenizer.pad_token_id}"
        )
    if config.max_position_embeddings < cfg.context_length:
        raise ValueError(f"context_length {cfg.context_length} exceeds {cfg.text_model}'s positions")


def _load_timm_trunk(trunk: nn.Module, checkpoint: str | Path) -> None:
    """Load a timm state dict into open_clip's trunk, whose classifier was removed.

    Done by hand because open_clip's ``pretrained_image_path`` loads into ``model.visual``
    with ``strict=False``, where timm's keys (no ``trunk.`` prefix) would silently match nothing.
    """
    import timm

    state = timm.models.load_state_dict(str(checkpoint))
    result = trunk.load_state_dict(state, strict=False)
    classifier = str(trunk.pretrained_cfg.get("classifier", ""))
    unexpected = [k for k in result.unexpected_keys if not (classifier and k.startswith(classifier + "."))]
    if result.missing_keys or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit the image trunk: missing {result.missing_keys[:5]}, unexpected {unexpected[:5]}"
        )


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _jsonable(obj):
    return json.loads(json.dumps(obj))
