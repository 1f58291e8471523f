"""Rule-made negative captions: each edit changes exactly the fact it claims to, and only valid edits are used."""

import pytest
import torch
from transformers import AutoTokenizer

from mcad_world.negatives import CaptionEdits, UnknownWordError
from mcad_world.synth import CAPTION_WORDS, RELATION_FLIPS
from mcad_world.tokenizer import train_wordpiece

CAPTIONS = [
    "a red circle left of a blue square",
    "a small red circle is above a small green cross",
    "a picture of a large blue triangle and, to its left, a small red square",
    "a cross",  # one grouped word: replace only
]


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    """A WordPiece tokenizer that knows every edit word (the tiny world's 128-token one splits some)."""
    words = [w for group in CAPTION_WORDS.values() for w in group] + list(RELATION_FLIPS)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_wordpiece(CAPTIONS + [" ".join(words)] * 3, out, vocab_size=256)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def edits_and_ids(world_tokenizer):
    tok = world_tokenizer
    ids = tok(CAPTIONS, padding="max_length", max_length=24, return_tensors="pt")["input_ids"]
    return tok, CaptionEdits.from_words(tok, CAPTION_WORDS, RELATION_FLIPS), ids


def _text(tok, ids):
    return tok.batch_decode(ids, skip_special_tokens=True)


def test_swap_exchanges_the_first_group_with_two_different_words(edits_and_ids):
    tok, edits, ids = edits_and_ids
    out, ok = edits.swap(ids)
    assert ok.tolist() == [True, True, True, False]
    assert _text(tok, out)[:3] == [
        "a blue circle left of a red square",
        "a small green circle is above a small red cross",  # sizes are equal, colours are swapped
        "a picture of a large red triangle and, to its left, a small blue square",
    ]
    assert torch.equal(out[3], ids[3])


def test_flip_turns_every_relation_word(edits_and_ids):
    tok, edits, ids = edits_and_ids
    out, ok = edits.flip_relation(ids)
    assert ok.tolist() == [True, True, True, False]
    assert _text(tok, out)[:3] == [
        "a red circle right of a blue square",
        "a small red circle is below a small green cross",
        "a picture of a large blue triangle and, to its right, a small red square",
    ]


def test_replace_changes_one_word_within_its_group(edits_and_ids):
    tok, edits, ids = edits_and_ids
    for seed in range(20):
        out, ok = edits.replace(ids, torch.Generator().manual_seed(seed))
        assert ok.all()
        changed = out != ids
        assert (changed.sum(1) == 1).all()
        old, new = ids[changed], out[changed]
        assert torch.equal(edits.group_of[old], edits.group_of[new]) and (edits.group_of[new] >= 0).all()


def test_random_edit_always_changes_a_caption_and_reports_none_left(edits_and_ids):
    _, edits, ids = edits_and_ids
    plain = torch.full_like(ids[:1], 0)  # padding only: no word to edit
    out, ok = edits(torch.cat([ids, plain]), torch.Generator().manual_seed(0))
    assert ok.tolist() == [True, True, True, True, False]
    assert (out[:4] != ids).any(1).all()


def test_words_must_be_single_tokens(world_tokenizer, tmp_path):
    with pytest.raises(UnknownWordError, match="zebra"):
        CaptionEdits.from_words(world_tokenizer, {"colour": ("red", "zebra")}, {})
    with pytest.raises(ValueError, match="2 or more"):
        CaptionEdits.from_words(world_tokenizer, {"colour": ("red", "red")}, {})
    small = train_wordpiece(CAPTIONS, tmp_path / "tok", vocab_size=128)  # never saw most edit words: spells them
    with pytest.raises(UnknownWordError, match="not a single token"):
        CaptionEdits.from_words(small, CAPTION_WORDS, RELATION_FLIPS)


def test_trained_tokenizer_files_repeat_across_processes(tmp_path):
    """Same captions, same files, whatever the process's hash seed (tokenizers' own trainer breaks ties by hash order)."""
    import os
    import subprocess
    import sys

    script = ("import sys; from mcad_world.tokenizer import train_wordpiece; "
              f"train_wordpiece({CAPTIONS!r} * 2, sys.argv[1], vocab_size=128)")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"tok{seed}"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True,
                       env=dict(os.environ, PYTHONHASHSEED=seed))
        outs.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert outs[0] == outs[1]


def test_tokenizer_vocabulary_words_by_count_after_every_character():
    from mcad_world.tokenizer import SPECIAL_TOKENS, wordpiece_vocab

    vocab = wordpiece_vocab(["b a b", "cc b a", "A dd"], vocab_size=16)
    assert vocab[:5] == SPECIAL_TOKENS
    assert vocab[5:] == ["a", "b", "c", "d", "##a", "##b", "##c", "##d", "cc", "dd"]  # a, b are characters already
    assert wordpiece_vocab(["b a b", "cc b a", "A dd"], vocab_size=14)[-1] == "cc"  # ties alphabetical, then cut
    with pytest.raises(ValueError, match="cannot hold"):
        wordpiece_vocab(["abc"], vocab_size=8)
