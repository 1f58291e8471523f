"""Augmented views that both stages can reproduce exactly: a crop box per (sample, view).

Stage 1 embeds every stored view with every teacher; stage 2 must feed the
student the *same* pixels, so a view is not a random transform applied on the
fly but a stored box ``(crop_x, crop_y, crop_w, crop_h)`` in normalized image
coordinates, drawn deterministically from ``(seed, key, view)``. Rendering a
box is one batched ``grid_sample`` (crop and resize in one step), the same
function in both stages.

View 0 is always the whole image, so a cache with ``views=1`` holds the
un-augmented image. Boxes never flip: the default world's captions say "left
of", and a flip would make them false.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FULL_VIEW = (0.0, 0.0, 1.0, 1.0)


def view_boxes(
    keys: Sequence[str], views: int, seed: int, scale: tuple[float, float] = (0.6, 1.0)
) -> np.ndarray:
    """(n, views, 4) float32 crop boxes; view 0 is the full image, the rest random square-ish crops.

    Each sample's boxes come from a generator seeded by ``(seed, key)`` alone, so
    any shard, worker or re-run draws the same boxes for the same sample.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"view scale must satisfy 0 < low <= high <= 1, got {scale}")
    boxes = np.empty((len(keys), views, 4), dtype=np.float32)
    boxes[:, 0] = FULL_VIEW
    if views == 1:
        return boxes
    for row, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        area = rng.uniform(low, high, size=views - 1)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), size=views - 1))
        w = np.clip(np.sqrt(area * aspect), 0.0, 1.0)
        h = np.clip(np.sqrt(area / aspect), 0.0, 1.0)
        x = rng.uniform(0.0, 1.0, size=views - 1) * (1.0 - w)
        y = rng.uniform(0.0, 1.0, size=views - 1) * (1.0 - h)
        boxes[row, 1:] = np.stack([x, y, w, h], axis=1)
    return boxes


def render_views(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (B, 4) out of uint8 ``images`` (B, 3, H, W) and resize to ``size``: uint8 (B, 3, size, size).

    The full box at the input size returns the input unchanged (a fast path,
    and the guarantee that ``views=1`` caches see the original pixels).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"render_views wants uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be ({images.shape[0]}, 4), got {tuple(boxes.shape)}")
    full = torch.tensor(FULL_VIEW)
    if tuple(images.shape[-2:]) == (size, size) and bool((boxes == full).all()):
        return images.clone()
    x, y, w, h = boxes.unbind(1)
    theta = torch.zeros(len(boxes), 2, 3)
    # affine_grid maps output coords in [-1, 1] to input coords: centre 2x+w-1, half-extent w.
    theta[:, 0, 0] = w
    theta[:, 0, 2] = 2 * x + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y + h - 1
    grid = F.affine_grid(theta, [len(boxes), 3, size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def square_size(size) -> int:
    """A model's input side from a preprocessing config: ``224`` or ``(224, 224)``; non-square is refused."""
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"non-square model input {tuple(size)} is not supported")
    return int(height)


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(B, 3, size, size)`` -> float pixels ``(x / 255 - mean) / std`` on ``mean``'s device.

    The fast path every tower shares (teachers and students): images already rendered at the
    model's input size, so a wrong size is an error rather than a silent resize.
    """
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"images are {tuple(images.shape[-2:])}, this model expects {size}x{size}")
    # The same three operations as ``(x / 255 - mean) / std``, in place on one fresh copy: the same floats,
    # without two more batch-sized temporaries (on a CPU their allocation cost as much as the arithmetic).
    pixels = images.to(mean.device, torch.float32, copy=True)
    return pixels.div_(255.0).sub_(mean).div_(std)
