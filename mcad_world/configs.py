"""Architectures of the small teachers trained on the embedded default world.

They are ordinary open_clip / transformers configs: the same loaders that read
ViT-L-14 or blip-itm-large read these.
"""

from __future__ import annotations

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import BlipConfig

from mcad_world.config import TowerShape

IMAGE_MEAN = tuple(OPENAI_DATASET_MEAN)
IMAGE_STD = tuple(OPENAI_DATASET_STD)


def clip_model_cfg(
    shape: TowerShape, image_size: int, vocab_size: int, context_length: int, eos_id: int, no_ln_pre: bool = False
) -> dict:
    """An open_clip model config whose text tower reads a BERT-style WordPiece tokenizer.

    ``no_ln_pre`` drops the LayerNorm before the first image block. BLIP's ViT has
    none, so only such a tower copies into BLIP's exactly (``init_vision_from_clip``)
    and can be locked there (``BlipRecipe.freeze_vision``).

    ``pool_type="eos"`` with the causal mask pools the ``[SEP]`` token, which has
    seen the whole caption and none of the padding after it.

    ``block_type="custom"`` is open_clip's own attention block (one fused q/k/v
    projection and ``scaled_dot_product_attention``) in place of its default
    ``nn.MultiheadAttention`` block: same parameter names, same outputs for the
    same weights, 1.12-1.22x faster per CPU training step (``bench/clip_block.py``).
    Build new models with ``build_clip``, which keeps the default block's
    initialization.
    """
    return {
        "embed_dim": shape.embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": shape.patch_size,
            "width": shape.width,
            "layers": shape.layers,
            "head_width": shape.width // shape.heads,
            "mlp_ratio": 2.0,
            "no_ln_pre": no_ln_pre,
            "block_type": "custom",
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": shape.width,
            "heads": shape.heads,
            "layers": shape.layers,
            "mlp_ratio": 2.0,
            "hf_tokenizer_name": "bundled",
            "pad_id": 0,
            "eos_id": eos_id,
            "pool_type": "eos",
            "block_type": "custom",
        },
    }


def with_block_type(model_cfg: dict, block_type: str) -> dict:
    """``model_cfg`` with both towers built from open_clip's ``block_type`` ("default" or "custom")."""
    return {
        **model_cfg,
        "vision_cfg": {**model_cfg["vision_cfg"], "block_type": block_type},
        "text_cfg": {**model_cfg["text_cfg"], "block_type": block_type},
    }


def build_clip(model_cfg: dict, **kwargs) -> open_clip.model.CLIP:
    """A new CLIP of ``model_cfg`` whose weights start as open_clip's default block would start them.

    The custom block draws its image tower's q/k/v projection from N(0, 1/head_dim),
    about 3x the Xavier init of ``nn.MultiheadAttention``, and its output projection
    keeps a random bias; trained from that start, clip_a reached 40.6 test mean recall
    instead of 51.2. So the weights come from a default-block model built first, from
    the same random state (the parameter names are the same); the model is the fast one.
    """
    start = open_clip.model.CLIP(**with_block_type(model_cfg, "default"), **kwargs)
    model = open_clip.model.CLIP(**model_cfg, **kwargs)
    model.load_state_dict(start.state_dict())
    return model


def clip_preprocess_cfg(image_size: int) -> dict:
    return {
        "size": image_size,
        "mean": list(IMAGE_MEAN),
        "std": list(IMAGE_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def blip_config(shape: TowerShape, image_size: int, vocab_size: int, context_length: int, tokens: dict) -> BlipConfig:
    """A BLIP ITM config; ``tokens`` holds the tokenizer's pad/cls/sep ids."""
    return BlipConfig(
        vision_config={
            "hidden_size": shape.width,
            "intermediate_size": 2 * shape.width,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "image_size": image_size,
            "patch_size": shape.patch_size,
            "projection_dim": shape.embed_dim,
            # BlipVisionConfig defaults to 1e-10, which starts the image tower at ~zero weights:
            # fine for loading pretrained checkpoints, crippling for training from scratch.
            "initializer_range": 0.02,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": shape.width,
            "intermediate_size": 2 * shape.width,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "max_position_embeddings": context_length,
            "projection_dim": shape.embed_dim,
            "pad_token_id": tokens["pad"],
            "bos_token_id": tokens["cls"],
            "sep_token_id": tokens["sep"],
            "eos_token_id": tokens["sep"],
        },
        projection_dim=shape.embed_dim,
        image_text_hidden_size=shape.embed_dim,
    )
