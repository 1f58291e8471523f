"""Rule-made hard negative captions for training the single-stream teacher's ITM head.

A true caption with one word edited so that it no longer describes the image:
one attribute replaced ("a red circle" -> "a green circle"), two attributes of
the same kind swapped between the objects ("a red circle left of a blue square"
-> "a blue circle left of a red square"), or the relation flipped ("left" ->
"right"). Each such negative differs from its positive in exactly one fact, so
the ITM head learns each attribute, its binding and the relation, which the
negatives mined from ITC similarities (mostly different scenes) teach slowly.
The edits follow the rule-based negatives of SVLC (Doveh et al., 2022) and the
swaps of NegCLIP (Yuksekgonul et al., 2023).

Edits work on token ids: the word lists come from the data itself (the
``caption_edits`` entry of a world's ``world.json``, which ``mcad data`` writes)
and must be single tokens of the tokenizer; an edit that leaves a caption
unchanged (two equal sizes swapped, a caption without a relation word) is not
used. Shards that describe no such vocabulary train without edited negatives,
for a reason that ``edits_from_world`` returns and the recipe logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


class UnknownWordError(ValueError):
    """A word of the edit lists is not one token of the tokenizer."""


@dataclass
class CaptionEdits:
    """Word groups and relation flips as lookup tables over the vocabulary."""

    group_of: torch.Tensor  # (V,) group index of each token, -1 for tokens in no group
    rank: torch.Tensor  # (V,) position of each token within its group
    members: torch.Tensor  # (G, M) token ids of each group, padded with -1
    sizes: torch.Tensor  # (G,) members per group
    flip: torch.Tensor  # (V,) the flipped relation word, or the token itself

    @classmethod
    def from_words(
        cls, tokenizer, groups: Mapping[str, Sequence[str]], flips: Mapping[str, str]
    ) -> "CaptionEdits":
        vocab = tokenizer.get_vocab()

        def token(word: str) -> int:
            if word not in vocab:
                raise UnknownWordError(f"caption-edit word {word!r} is not a single token of the tokenizer")
            return vocab[word]

        size = len(tokenizer)
        group_of = torch.full((size,), -1, dtype=torch.long)
        rank = torch.zeros(size, dtype=torch.long)
        widest = max(len(words) for words in groups.values())
        members = torch.full((len(groups), widest), -1, dtype=torch.long)
        for g, words in enumerate(groups.values()):
            if len(set(words)) < 2:
                raise ValueError(f"a caption-edit group needs 2 or more distinct words, got {list(words)}")
            for r, word in enumerate(words):
                group_of[token(word)], rank[token(word)], members[g, r] = g, r, token(word)
        flip = torch.arange(size)
        for word, flipped in flips.items():
            flip[token(word)] = token(flipped)
        sizes = torch.tensor([len(words) for words in groups.values()])
        return cls(group_of, rank, members, sizes, flip)

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One random edit per caption: ``(edited ids, valid)``; ``valid`` is False where no edit applies."""
        options = [self.replace(input_ids, generator), self.swap(input_ids), self.flip_relation(input_ids)]
        edited = torch.stack([ids for ids, _ in options], 1)  # (B, 3, L)
        valid = torch.stack([ok for _, ok in options], 1)  # (B, 3)
        pick = torch.multinomial(valid.float() + (~valid.any(1, keepdim=True)).float(), 1, generator=generator)
        rows = torch.arange(len(input_ids))
        return edited[rows, pick[:, 0]], valid.any(1)

    def replace(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One grouped word, chosen at random, replaced by another word of its group."""
        group = self.group_of[input_ids]  # (B, L)
        has = (group >= 0).any(1)
        weights = (group >= 0).float() + (~has)[:, None].float()
        position = torch.multinomial(weights, 1, generator=generator)[:, 0]
        rows = torch.arange(len(input_ids))
        old = input_ids[rows, position]
        g = self.group_of[old].clamp(min=0)
        n = self.sizes[g]
        shift = 1 + (torch.rand(len(old), generator=generator) * (n - 1)).long()
        new = self.members[g, (self.rank[old] + shift) % n]
        out = input_ids.clone()
        out[rows[has], position[has]] = new[has]
        return out, has

    def swap(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two different words of one group exchanged (the first group where a caption has two)."""
        out = input_ids.clone()
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        group = self.group_of[input_ids]
        for g in range(len(self.sizes)):
            hits = group == g
            pairs = (hits.sum(1) == 2) & ~done
            if not pairs.any():
                continue
            first = hits.float().argmax(1)
            last = input_ids.shape[1] - 1 - hits.flip(1).float().argmax(1)
            rows = torch.arange(len(input_ids))
            a, b = input_ids[rows, first], input_ids[rows, last]
            pairs &= a != b
            out[rows[pairs], first[pairs]] = b[pairs]
            out[rows[pairs], last[pairs]] = a[pairs]
            done |= pairs
        return out, done

    def flip_relation(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every relation word turned into its inverse."""
        out = self.flip[input_ids]
        return out, (out != input_ids).any(1)


def edits_from_world(data_dir: str | Path, tokenizer) -> tuple[CaptionEdits | None, str]:
    """The edits a data directory's ``world.json`` describes, or ``None`` and why not.

    Never raises on a world that describes no edit vocabulary, or one the
    tokenizer splits: edited negatives are an aid to the recipe, not a
    requirement, so such data trains without them and the reason is reported.
    """
    path = Path(data_dir) / "world.json"
    if not path.is_file():
        return None, f"off: {path} does not exist, so the data names no words to edit"
    try:
        described = json.loads(path.read_text()).get("caption_edits")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        return None, f"off: {path} is not a JSON object ({err})"
    if not isinstance(described, dict) or not isinstance(described.get("groups"), dict):
        return None, f"off: {path} has no caption_edits.groups"
    groups = {str(name): tuple(words) for name, words in described["groups"].items() if isinstance(words, list)}
    flips = described.get("flips") or {}
    if not groups or not isinstance(flips, dict):
        return None, f"off: {path}'s caption_edits are empty or malformed"
    try:
        edits = CaptionEdits.from_words(tokenizer, groups, flips)
    except ValueError as err:  # UnknownWordError included: a word the tokenizer splits
        return None, f"off: {err}"
    return edits, f"on: {len(groups)} word groups and {len(flips)} relation flips from {path}"
