"""`mcad teachers`' configuration: the teachers trained on the generated world (or your own shards)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mcad_core.config import jsonable


@dataclass(frozen=True)
class TowerShape:
    """Width and depth of a small transformer tower pair (image and text alike)."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    embed_dim: int = 128
    patch_size: int = 8


@dataclass(frozen=True)
class Schedule:
    """One teacher's optimisation schedule: AdamW, linear warmup, cosine decay."""

    steps: int
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.05


TEACHERS = ("clip_a", "clip_b", "blip")  # what `mcad teachers` trains, in order
BLIP_VISION_INITS = ("", "clip_a", "clip_b")  # what BLIP's image tower may start from ("": scratch)


def check_schedule(name: str, schedule: Schedule) -> None:
    """A contrastive schedule needs at least one step and two images per batch (the others are the negatives)."""
    if schedule.batch_size < 2 or schedule.steps < 1:
        raise ValueError(f"the {name} schedule needs steps >= 1 and batch_size >= 2 (contrastive), got "
                         f"{schedule.steps} steps of {schedule.batch_size}")


def check_shape(name: str, shape: TowerShape) -> None:
    """Attention splits a tower's width evenly over its heads."""
    if shape.heads <= 0 or shape.width <= 0 or shape.width % shape.heads:
        raise ValueError(f"{name}'s width must be a positive multiple of its {shape.heads} heads, got {shape.width}")


@dataclass(frozen=True)
class BlipRecipe:
    """The BLIP ITM teacher's whole recipe (README, "Teachers on the default world"): shape, schedule and losses.

    Checked when made, so a bad recipe fails before any training. The messages name each
    setting ``blip_X``: ``--blip-X`` on the command line, ``X`` in a config file's ``[blip]`` table.
    """

    shape: TowerShape = TowerShape(width=128, layers=4, heads=4, embed_dim=128)
    schedule: Schedule = Schedule(steps=320)
    # Share of words the image-conditioned MLM masks (ALBEF's third loss; 0: off). From scratch it is what got
    # ITM off the constant guess; on the locked, trained clip_a tower ITM learns without it, and dropping it gave
    # a better and 15 % cheaper BLIP (README).
    mask_prob: float = 0.0
    mined_negatives: int = 1  # ITM negatives per image and per text drawn from the ITC softmax (ALBEF)
    uniform_share: float = 0.5  # share of a uniform draw mixed into the mined negatives' distribution
    random_negatives: int = 0  # uniform ITM negatives per image and per text besides the mined ones
    # One rule-made negative caption per image for ITM: an attribute replaced or swapped, or the relation
    # flipped (mcad_world/negatives.py; the words are the default world's, mcad_world/synth.py).
    edit_negatives: bool = True
    listwise: bool = True  # add a softmax ITM term over each query's group (its true pair and negatives)
    # Start BLIP's image tower from this trained CLIP's (same shape), as METER / BLIP-2 start from CLIP; "": scratch.
    vision_init: str = "clip_a"
    # Lock that image tower (LiT): its tokens are computed once and only the text/cross-attention side trains.
    freeze_vision: bool = True
    # Text-to-image ITM negatives per text drawn from its ITC top 16 over the whole split (needs the locked tower).
    split_negatives: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"blip_mask_prob must be in [0, 1), got {self.mask_prob}")
        if self.mined_negatives < 0:
            raise ValueError(f"blip_mined_negatives must be >= 0, got {self.mined_negatives}")
        if not 0.0 <= self.uniform_share <= 1.0:
            raise ValueError(f"blip_uniform_share must be in [0, 1], got {self.uniform_share}")
        if self.random_negatives < 0:
            raise ValueError(f"blip_random_negatives must be >= 0, got {self.random_negatives}")
        if self.vision_init not in BLIP_VISION_INITS:
            raise ValueError(f"blip_vision_init must be one of {list(BLIP_VISION_INITS)} ('': from scratch), "
                             f"got {self.vision_init!r}")
        if self.freeze_vision and not self.vision_init:
            raise ValueError("blip_freeze_vision locks a trained image tower: set blip_vision_init (clip_a or clip_b)")
        if self.split_negatives < 0:
            raise ValueError(f"blip_split_negatives must be >= 0, got {self.split_negatives}")
        if self.split_negatives and not self.freeze_vision:
            raise ValueError("blip_split_negatives needs the locked image tower (blip_freeze_vision)")
        check_shape("blip", self.shape)
        check_schedule("blip", self.schedule)


@dataclass(frozen=True)
class TeachersConfig:
    """`mcad teachers`: train the default world's teachers and save them in hub layouts."""

    data_dir: Path = Path("data/default")
    out_dir: Path = Path("artifacts/teachers")
    seed: int = 0
    vocab_size: int = 512
    context_length: int = 24
    # Training images are resized to this square size; None: the most common size among the split's first
    # samples (img2dataset shards written with resize_mode=no or keep_ratio mix sizes).
    image_size: int | None = None
    clip_a: TowerShape = TowerShape(width=128, layers=4, heads=4, embed_dim=128)
    clip_b: TowerShape = TowerShape(width=64, layers=4, heads=4, embed_dim=64)
    clip_schedule: Schedule = Schedule(steps=400)
    clip_ln_pre: bool = False  # open_clip's pre-block LayerNorm; BLIP's ViT has none, so a locked copy needs it off
    blip: BlipRecipe = BlipRecipe()
    only: tuple[str, ...] = ()  # retrain just these of clip_a, clip_b, blip; keep the rest (and the tokenizer)
    threads: int = 2
    # Threads that each encode a slice of every CLIP training batch with one intra-op thread
    # (mcad_world/parallel.py); 1: one graph per step on `threads` intra-op threads.
    clip_workers: int = 2
    on_error: str = "raise"  # shard error policy: "warn" skips and counts, "raise" stops

    def to_dict(self) -> dict:
        return jsonable(asdict(self))
