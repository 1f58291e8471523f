"""A WordPiece tokenizer trained on a caption corpus, saved in the standard Hugging Face layout.

Hub teachers ship their own tokenizers; the embedded default world has no hub, so
its teachers and students share one tokenizer trained here on its captions and
loaded back through ``AutoTokenizer.from_pretrained(dir)`` like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import BertWordPieceTokenizer
from transformers import BertTokenizerFast

from pipeline.atomic import atomic_dir

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(captions: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> BertTokenizerFast:
    """Train a lowercase WordPiece vocabulary; ``[PAD]`` is id 0, which open_clip's pad mask assumes."""
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(
        list(captions), vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=trainer._tokenizer,
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
