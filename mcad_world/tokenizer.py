"""A WordPiece tokenizer trained on a caption corpus, saved in the standard Hugging Face layout.

Hub teachers ship their own tokenizers; the embedded default world has no hub, so
its teachers and students share one tokenizer trained here on its captions and
loaded back through ``AutoTokenizer.from_pretrained(dir)`` like any other.

The vocabulary is built deterministically from the corpus's word counts: the
special tokens, every character (alone and as a ``##`` continuation, so any word
of those characters can be spelled), then whole words by falling count (ties
alphabetical) up to ``vocab_size``. ``tokenizers``' own WordPiece trainer breaks
ties between equal counts in hash-map order, so two trainings on the same
captions could number (and split) the words differently, and teachers trained
from the same seed then start from different embeddings; this one gives the same
files every time. A small caption world's words all fit, so each is one token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertTokenizerFast

from mcad_core.atomic import atomic_dir

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocab(captions: Iterable[str], vocab_size: int) -> list[str]:
    """The vocabulary in id order: specials, characters, ``##`` characters, then the most frequent words."""
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts = Counter(word for text in captions
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({char for word in counts for char in word})
    vocab = SPECIAL_TOKENS + chars + [f"##{char}" for char in chars]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the {len(SPECIAL_TOKENS)} special tokens and the "
                         f"captions' {len(chars)} characters (alone and as ## continuations): {len(vocab)} needed")
    words = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    return vocab + words[: vocab_size - len(vocab)]


def train_wordpiece(captions: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> BertTokenizerFast:
    """Train a lowercase WordPiece vocabulary; ``[PAD]`` is id 0, which open_clip's pad mask assumes."""
    vocab = wordpiece_vocab(captions, vocab_size)
    tokenizer = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)},
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return BertTokenizerFast.from_pretrained(str(out_dir))
