import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mcad_cache.teachers.dual import OPEN_CLIP_CONFIG, DualStreamTeacher, DualTeacherSpec
from mcad_cache.teachers.identity import state_dict_sha256
from mcad_cache.teachers.single import load_single
from mcad_world.train import CaptionTable, MaskedWords, blip_losses, masked_words_for, tokenize_captions
from mcad_world.config import BlipRecipe, Schedule, TowerShape
from mcad_core.optim import adamw_warmup_cosine, warmup_cosine

_TINY_SHAPE = TowerShape(width=32, layers=1, heads=2, embed_dim=16, patch_size=8)  # conftest's TINY (not importable)


def _images(n=3, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_dual_teacher_round_trip_through_local_dir(tiny_clip):
    model, spec = tiny_clip
    assert spec.name.startswith("local-dir:")
    teacher = DualStreamTeacher.load(spec)
    assert teacher.identity().weights_sha256 == state_dict_sha256(model)
    texts = ["a red circle left of a blue square", "a blue circle left of a red square"]
    pixels = teacher.pixels_from_uint8(_images())
    with torch.no_grad():
        expected_img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        expected_txt = torch.nn.functional.normalize(model.encode_text(teacher.tokenize(texts)), dim=-1)
    assert torch.allclose(teacher.encode_images(pixels), expected_img, atol=1e-6)
    assert torch.allclose(teacher.encode_texts(texts), expected_txt, atol=1e-6)
    assert torch.allclose(teacher.encode_texts(texts).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_dual_teacher_owns_its_preprocessing(tiny_clip):
    teacher = DualStreamTeacher.load(tiny_clip[1])
    images = _images(2)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    assert torch.allclose(teacher.pixels_from_pil(pil), teacher.pixels_from_uint8(images), atol=1e-5)
    with pytest.raises(ValueError, match="expects 32x32"):
        teacher.pixels_from_uint8(_images(1, size=16))


def test_dual_tokenizer_is_the_bundled_wordpiece(tiny_clip):
    teacher = DualStreamTeacher.load(tiny_clip[1])
    config = json.loads((Path(teacher.spec.name.removeprefix("local-dir:")) / OPEN_CLIP_CONFIG).read_text())
    tokens = teacher.tokenize(["a red circle"])
    assert tokens.shape == (1, config["model_cfg"]["text_cfg"]["context_length"])
    assert tokens[0, 0].item() == teacher.tokenizer.tokenizer.cls_token_id
    assert (tokens[0] == config["model_cfg"]["text_cfg"]["eos_id"]).sum() == 1


def test_weight_hash_changes_with_weights(tiny_clip):
    model, _ = tiny_clip
    before = state_dict_sha256(model)
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    try:
        assert state_dict_sha256(model) != before
    finally:
        with torch.no_grad():
            model.logit_scale.sub_(1.0)
    assert state_dict_sha256(model) == before


def test_single_teacher_matches_the_model_forward(tiny_blip):
    model, spec = tiny_blip
    teacher = load_single(spec)
    assert teacher.identity().weights_sha256 == state_dict_sha256(model)
    texts = ["a red circle left of a blue square", "a green cross above a yellow triangle", "a red square"]
    pixels = teacher.pixels_from_uint8(_images())
    batch = teacher.tokenize(texts)
    with torch.no_grad():
        vision = teacher.vision_tokens(pixels)
        itm = teacher.itm(vision, batch)
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)
        itc = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
                    use_itm_head=False)
        ours_itc = teacher.itc_images(vision) @ teacher.itc_texts(batch).t()
    ref = reference.itm_score
    assert torch.allclose(itm.logits, ref[:, 1] - ref[:, 0], atol=1e-5)
    assert itm.fused.shape == (3, teacher.fused_dim)
    assert torch.allclose(ours_itc, itc.itm_score, atol=1e-5)


def test_itm_refuses_misaligned_pairs(tiny_blip):
    teacher = load_single(tiny_blip[1])
    vision = teacher.vision_tokens(teacher.pixels_from_uint8(_images(2)))
    with pytest.raises(ValueError, match="aligned pairs"):
        teacher.itm(vision, teacher.tokenize(["one text"]))


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")  # weights copied onto meta are dropped
def test_teachers_loaded_onto_a_device_normalize_and_encode_there(tiny_clip, tiny_blip):
    """A teacher loaded onto a device keeps its mean/std there, so its CPU inputs (uint8 renders, token ids) are
    moved to the model's device: with them left on the CPU every stage-1 forward on a GPU failed. The meta device
    stands in for a GPU, since it too refuses CPU operands. (BLIP's text encoder reads values, which meta tensors
    do not have, so only its image side runs here.)"""
    dual_teacher = DualStreamTeacher.load(tiny_clip[1], "meta")
    assert dual_teacher.mean.device.type == dual_teacher.std.device.type == "meta"
    assert dual_teacher.encode_images(dual_teacher.pixels_from_uint8(_images())).device.type == "meta"
    assert dual_teacher.encode_texts(["a red circle"]).device.type == "meta"
    single = load_single(tiny_blip[1], "meta")
    assert single.mean.device.type == single.std.device.type == "meta"
    assert single.itc_images(single.vision_tokens(single.pixels_from_uint8(_images()))).device.type == "meta"


def _vision(model) -> torch.Tensor:
    """The image tower's tokens for 3 random 32x32 images (what train_blip hands blip_losses)."""
    return model.vision_model(pixel_values=torch.randn(3, 3, 32, 32)).last_hidden_state


def _blip_batch(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    table = tokenize_captions(tok, [["a red circle"], ["a blue square", "a square that is blue"], ["a cross"]], 24)
    images = torch.tensor([0, 1, 2])
    rows = table.first[images]
    return tok, table.input_ids[rows], table.attention_mask[rows], images[:, None] == images[None, :]


def test_blip_losses_train_every_head(tiny_blip, tokenizer_dir):
    """ITC, binary and listwise ITM (2 mined + 1 uniform negatives each way) and the MLM all reach their weights."""
    model, _ = tiny_blip
    model.train()
    tok, ids, mask, same = _blip_batch(tokenizer_dir)
    mlm = masked_words_for(model, tok, prob=0.5)
    vision = _vision(model)
    terms = blip_losses(model, vision, ids, mask, same, torch.Generator().manual_seed(0),
                        negatives=2, listwise=True, mlm=mlm, random_negatives=1)
    terms["loss"].backward()
    assert set(terms) == {"itc", "itm", "itm_list", "mlm", "loss"}
    assert torch.allclose(terms["loss"], terms["itc"] + terms["itm"] + terms["itm_list"] + terms["mlm"])
    assert model.itm_head.weight.grad.abs().sum() > 0
    assert model.vision_proj.weight.grad.abs().sum() > 0
    assert mlm.head.weight.grad.abs().sum() > 0
    cross = model.text_encoder.encoder.layer[0].crossattention.self.key.weight.grad
    assert cross is not None and cross.abs().sum() > 0
    model.zero_grad()
    model.eval()


def test_blip_losses_binary_itm_without_mlm(tiny_blip, tokenizer_dir):
    model, _ = tiny_blip
    tok, ids, mask, same = _blip_batch(tokenizer_dir)
    with torch.no_grad():
        vision = _vision(model)
        terms = blip_losses(model, vision, ids, mask, same, torch.Generator().manual_seed(0))
    assert set(terms) == {"itc", "itm", "loss"}


def test_blip_losses_do_not_depend_on_trailing_padding(tiny_blip, tokenizer_dir):
    """Cutting a batch's captions to their longest real length (what train_blip does) leaves every term as it was."""
    model, _ = tiny_blip
    tok, ids, mask, same = _blip_batch(tokenizer_dir)
    length = int(mask.sum(1).max())
    assert length < ids.shape[1]
    with torch.no_grad():
        vision = _vision(model)
        full, cut = (
            blip_losses(model, vision, i, m, same, torch.Generator().manual_seed(0), listwise=True)
            for i, m in ((ids, mask), (ids[:, :length], mask[:, :length]))
        )
    for name in ("itc", "itm", "itm_list"):
        assert torch.allclose(full[name], cut[name], atol=1e-5), name


def test_masked_words_mask_only_real_words(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    enc = tok(["a red circle left of a blue square", "a cross"], padding="max_length", max_length=12,
              return_tensors="pt")
    words = MaskedWords(8, len(tok), [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id], tok.mask_token_id,
                        prob=1.0)
    masked = words.mask(enc["input_ids"], enc["attention_mask"], torch.Generator().manual_seed(0))
    special = (enc["input_ids"] == tok.cls_token_id) | (enc["input_ids"] == tok.sep_token_id)
    expected = enc["attention_mask"].bool() & ~special
    assert torch.equal(masked, expected)  # prob 1: every real word, no [CLS]/[SEP]/padding
    none = MaskedWords(8, len(tok), [tok.cls_token_id], tok.mask_token_id, prob=0.0)
    assert not none.mask(enc["input_ids"], enc["attention_mask"], torch.Generator()).any()


def test_caption_table_samples_only_own_captions():
    table = CaptionTable(
        input_ids=torch.zeros(5, 2, dtype=torch.long), attention_mask=torch.ones(5, 2, dtype=torch.long),
        image_of=torch.tensor([0, 0, 1, 2, 2]), first=torch.tensor([0, 2, 3]), count=torch.tensor([2, 1, 2]),
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.tensor([0, 1, 2] * 50)
    rows = table.sample(images, generator)
    assert torch.equal(table.image_of[rows], images)
    assert set(rows[images == 0].tolist()) == {0, 1}


def test_warmup_cosine_schedule():
    factor = warmup_cosine(steps=110, warmup=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0, abs=1e-12)


def test_adamw_lr_scales_and_decay_groups():
    model = torch.nn.ModuleDict({"visual": torch.nn.Linear(3, 4), "text": torch.nn.Linear(3, 4)})
    optimizer, _ = adamw_warmup_cosine(model, lr=1e-3, weight_decay=0.1, steps=10, warmup=1,
                                       lr_scales={"visual.": 10.0})
    seen = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            seen[id(param)] = (round(group["initial_lr"], 9), group["weight_decay"])
    assert seen == {
        id(model["visual"].weight): (1e-2, 0.1),
        id(model["visual"].bias): (1e-2, 0.0),
        id(model["text"].weight): (1e-3, 0.1),
        id(model["text"].bias): (1e-3, 0.0),
    }


def test_dual_spec_local_is_absolute(tmp_path):
    spec = DualTeacherSpec.local(tmp_path / "x")
    assert spec.name == f"local-dir:{(tmp_path / 'x').resolve()}"


def _terms_with_edits(tiny_blip, tokenizer_dir) -> dict[str, dict]:
    """BLIP's terms (listwise on) without edits, with edits of words no caption has, and with colour edits."""
    from mcad_world.negatives import CaptionEdits

    model, _ = tiny_blip
    tok, ids, mask, same = _blip_batch(tokenizer_dir)
    with torch.no_grad():
        vision = _vision(model)
    edits = {
        "plain": None,
        "no such words": CaptionEdits.from_words(tok, {"g": ("left", "right")}, {}),
        "colours": CaptionEdits.from_words(tok, {"colour": ("red", "blue")}, {}),
    }
    with torch.no_grad():
        return {
            name: blip_losses(model, vision, ids, mask, same, torch.Generator().manual_seed(0), listwise=True,
                              edits=e)
            for name, e in edits.items()
        }


def test_blip_losses_score_edited_captions_as_extra_negatives(tiny_blip, tokenizer_dir):
    """Edited captions add ITM pairs (the term changes); captions with no editable word add none."""
    terms = _terms_with_edits(tiny_blip, tokenizer_dir)
    assert torch.allclose(terms["no such words"]["itm"], terms["plain"]["itm"])
    assert not torch.allclose(terms["colours"]["itm"], terms["plain"]["itm"])


def test_blip_image_tower_starts_from_a_clip_of_the_same_shape(tokenizer_dir):
    """Without open_clip's ln_pre (which BLIP's ViT lacks) the copy is exact: same ITC image embedding."""
    import open_clip
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    from mcad_world.configs import blip_config, clip_model_cfg
    from mcad_world.train import init_vision_from_clip
    TINY, IMAGE_SIZE, CONTEXT = _TINY_SHAPE, 32, 24
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    cfg = clip_model_cfg(TINY, IMAGE_SIZE, len(tok), CONTEXT, tok.sep_token_id, no_ln_pre=True)
    clip = open_clip.model.CLIP(**cfg).eval()
    tokens = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id}
    blip = BlipForImageTextRetrieval(blip_config(TINY, IMAGE_SIZE, len(tok), CONTEXT, tokens)).eval()
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        before = blip.vision_proj(blip.vision_model(pixel_values=pixels).last_hidden_state[:, 0])
        init_vision_from_clip(blip, clip.visual)
        after = blip.vision_proj(blip.vision_model(pixel_values=pixels).last_hidden_state[:, 0])
        expected = clip.visual(pixels)
    assert torch.allclose(after, expected, atol=1e-5)
    assert not torch.allclose(before, expected, atol=1e-2)

    wider = open_clip.model.CLIP(**clip_model_cfg(TowerShape(width=64, layers=1, heads=2, embed_dim=16),
                                                  IMAGE_SIZE, len(tok), CONTEXT, tok.sep_token_id))
    with pytest.raises(ValueError, match="differ in shape"):
        init_vision_from_clip(blip, wider.visual)


def test_listwise_itm_puts_the_edited_caption_in_its_image_group(tiny_blip, tokenizer_dir):
    """With edits, each image's listwise group gains its edited caption; without a valid edit it gains nothing."""
    terms = _terms_with_edits(tiny_blip, tokenizer_dir)
    plain = terms["plain"]["itm_list"]
    assert torch.allclose(terms["no such words"]["itm_list"], plain)
    with_edits = terms["colours"]["itm_list"]
    assert torch.isfinite(with_edits) and with_edits > plain  # one more negative per group: a larger softmax loss


def test_mixing_uniform_negatives_into_the_mined_distribution():
    from mcad_world.train import _mix_uniform

    weights = torch.tensor([[0.0, 0.9, 0.1, 0.0], [0.5, 0.0, 0.0, 0.5]])
    allowed = torch.tensor([[False, True, True, True], [True, False, True, True]])
    half = _mix_uniform(weights, allowed, 0.5)
    expected = torch.tensor([[0.0, 0.45 + 1 / 6, 0.05 + 1 / 6, 1 / 6], [0.25 + 1 / 6, 0.0, 1 / 6, 0.25 + 1 / 6]])
    assert torch.allclose(half, expected, atol=1e-6)
    assert torch.allclose(_mix_uniform(weights, allowed, 1.0), allowed.float() / 3, atol=1e-6)
    assert torch.allclose(_mix_uniform(weights, allowed, 0.0), weights / weights.sum(1, keepdim=True), atol=1e-6)


def test_frozen_image_tower_trains_only_the_text_side(tokenizer_dir):
    """LiT mode: the image tower's weights and tokens stay as they were; text, cross-attention and heads train."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    from mcad_world.configs import blip_config
    from mcad_world.train import image_tokens, train_blip
    from mcad_world.config import BlipRecipe, Schedule

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    tokens = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id}
    blip = BlipForImageTextRetrieval(blip_config(_TINY_SHAPE, 32, len(tok), 24, tokens))
    table = tokenize_captions(tok, [["a red circle"], ["a blue square"], ["a cross"], ["a green cross"]], 24)
    pixels = torch.randn(4, 3, 32, 32)
    before = {name: param.detach().clone() for name, param in blip.named_parameters()}
    expected = image_tokens(blip, pixels)
    recipe = BlipRecipe(schedule=Schedule(steps=2, batch_size=4, warmup=1), listwise=True, uniform_share=0.0,
                        freeze_vision=True)
    train_blip(blip, pixels, table, recipe, seed=0)
    changed = {name for name, param in blip.named_parameters() if not torch.equal(param, before[name])}
    assert not {name for name in changed if name.startswith("vision_model.")}
    assert {"vision_proj.weight", "itm_head.weight"} <= changed
    assert any(name.startswith("text_encoder.") and "crossattention" in name for name in changed)
    assert torch.equal(image_tokens(blip, pixels), expected)


def test_locked_tower_options_are_checked_before_any_training(tmp_path):
    from mcad_world.train import train_teachers
    from mcad_world.config import BlipRecipe, TeachersConfig

    with pytest.raises(ValueError, match="blip_vision_init"):
        train_teachers(TeachersConfig(data_dir=tmp_path, out_dir=tmp_path / "out", blip=BlipRecipe(vision_init="")))
    with pytest.raises(ValueError, match="blip_freeze_vision"):
        train_teachers(TeachersConfig(data_dir=tmp_path, out_dir=tmp_path / "out",
                                      blip=BlipRecipe(freeze_vision=False, split_negatives=2)))
    with pytest.raises(ValueError, match="clip_ln_pre"):
        train_teachers(TeachersConfig(data_dir=tmp_path, out_dir=tmp_path / "out", clip_ln_pre=True))


def test_split_negatives_come_from_each_texts_itc_top_and_never_its_own_image(tiny_blip):
    from mcad_world.train import SplitNegatives

    model, _ = tiny_blip
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(12, 3, model.config.vision_config.hidden_size, generator=generator)
    text_feat = F.normalize(torch.randn(2, model.config.image_text_hidden_size, generator=generator), dim=-1)
    own = torch.tensor([4, 7])
    with torch.no_grad():
        image_feat = F.normalize(model.vision_proj(tokens[:, 0]), dim=-1)
        ranked = (text_feat @ image_feat.t()).argsort(1, descending=True)
    mined = SplitNegatives(model, tokens, count=3, top=4).for_batch(own)(text_feat, generator)
    assert mined.shape == (2, 3, *tokens.shape[1:])
    for text in range(2):
        allowed = [i for i in ranked[text].tolist() if i != own[text]][:4]
        rows = [next(i for i in range(12) if torch.equal(tokens[i], m)) for m in mined[text]]
        assert len(set(rows)) == 3 and set(rows) <= set(allowed)


def test_split_negatives_join_each_texts_listwise_group(tiny_blip, tokenizer_dir):
    """Each mined image is one more ITM pair and one more member of its text's listwise group."""
    model, _ = tiny_blip
    tok, ids, mask, same = _blip_batch(tokenizer_dir)
    with torch.no_grad():
        vision = _vision(model)

        def two_more(text_feat, generator):  # every text gets images 0 and 1 of the batch as extra negatives
            return vision[:2][None].expand(len(text_feat), -1, -1, -1)

        plain, more = (blip_losses(model, vision, ids, mask, same, torch.Generator().manual_seed(0), listwise=True,
                                   split_negatives=miner) for miner in (None, two_more))
    assert not torch.allclose(plain["itm"], more["itm"])
    assert more["itm_list"] > plain["itm_list"]


def test_fused_states_with_image_rows_equal_the_per_pair_pass(tiny_blip, tokenizer_dir):
    """Keys and values once per image, gathered per pair: same states and same gradients as one image copy a pair."""
    from mcad_cache.teachers.blip import fused_states

    model, _ = tiny_blip
    _, ids, mask, _ = _blip_batch(tokenizer_dir)
    text_rows = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    image_rows = torch.tensor([0, 1, 2, 1, 2, 0, 2])  # every image in two or three pairs
    ids, mask = ids[text_rows], mask[text_rows]
    vision = _vision(model).detach()
    key = model.text_encoder.encoder.layer[0].crossattention.self.key

    def run(per_image: bool):
        tokens = vision.clone().requires_grad_(True)
        model.zero_grad()
        if per_image:
            states = fused_states(model, ids, mask, tokens, image_rows=image_rows)
        else:
            states = fused_states(model, ids, mask, tokens[image_rows])
        (states * torch.linspace(-1, 1, states.shape[-1])).sum().backward()
        return states.detach(), tokens.grad, key.weight.grad.clone()

    for reference, shared in zip(run(per_image=False), run(per_image=True)):
        assert torch.allclose(reference, shared, atol=1e-5)
    assert "forward" not in vars(key)  # the redirect is gone after the call
    model.zero_grad()
    with pytest.raises(ValueError, match="2 image rows for 7 texts"):
        fused_states(model, ids, mask, vision, image_rows=image_rows[:2])


def test_fused_states_by_length_match_one_padded_pass_on_every_real_token(tiny_blip, tokenizer_dir):
    from mcad_cache.teachers.blip import fused_states, fused_states_by_length

    model, _ = tiny_blip
    _, ids, mask, _ = _blip_batch(tokenizer_dir)
    text_rows = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    image_rows = torch.tensor([0, 1, 2, 1, 2, 0, 2])
    ids, mask = ids[text_rows], mask[text_rows]
    assert len(set(mask.sum(1).tolist())) > 1  # captions of different lengths, so the groups cut differently
    vision = _vision(model).detach()
    with torch.no_grad():
        reference = fused_states(model, ids, mask, vision[image_rows])
        for rows, tokens in ((image_rows, vision), (None, vision[image_rows])):
            for groups in (1, 3, 20):
                grouped = fused_states_by_length(model, ids, mask, tokens, rows, groups=groups)
                real = mask.bool()
                assert grouped.shape == reference.shape
                assert torch.allclose(grouped[real], reference[real], atol=1e-5), (rows is None, groups)


def test_build_clip_gives_the_custom_block_the_default_blocks_initialization(tokenizer_dir):
    import open_clip
    from transformers import AutoTokenizer

    from mcad_world.configs import build_clip, clip_model_cfg, with_block_type

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = clip_model_cfg(_TINY_SHAPE, 32, len(tok), 24, tok.sep_token_id, no_ln_pre=True)
    assert cfg["vision_cfg"]["block_type"] == cfg["text_cfg"]["block_type"] == "custom"
    torch.manual_seed(0)
    model = build_clip(cfg).eval()
    torch.manual_seed(0)
    default = open_clip.model.CLIP(**with_block_type(cfg, "default")).eval()
    for tower in (model.visual, model):
        attn = tower.transformer.resblocks[0].attn
        assert isinstance(attn, open_clip.transformer.Attention)
    assert isinstance(default.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    state = model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in default.state_dict().items())
    pixels, texts = torch.randn(2, 3, 32, 32), torch.randint(5, len(tok), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), default.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(texts), default.encode_text(texts), atol=1e-5, rtol=1e-5)


def _tiny_clip_training(tokenizer_dir, workers: int, steps: int = 3):
    """A tiny CLIP after ``steps`` of train_clip on 16 random images with two captions each."""
    from transformers import AutoTokenizer

    from mcad_world.configs import build_clip, clip_model_cfg
    from mcad_world.train import train_clip
    from mcad_world.config import Schedule

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    captions = [[f"a red circle left of a blue square {i}", f"a blue square {i}"] for i in range(16)]
    table = tokenize_captions(tok, captions, 24)
    pixels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = build_clip(clip_model_cfg(_TINY_SHAPE, 32, len(tok), 24, tok.sep_token_id, no_ln_pre=True),
                       output_dict=True)
    summary = train_clip(model, pixels, table, Schedule(steps=steps, batch_size=8, warmup=1), seed=0, desc="t",
                         workers=workers)
    return model, summary


def test_clip_batch_split_over_worker_threads_gives_the_one_graph_gradients(tiny_clip):
    from open_clip.loss import ClipLoss

    from mcad_world.parallel import SplitBatch
    from mcad_world.train import clip_loss

    model = tiny_clip[0]
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = torch.randint(5, model.token_embedding.num_embeddings, (8, 24), generator=torch.Generator().manual_seed(3))
    loss_fn = ClipLoss()

    def gradients(step) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        step()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    one = gradients(lambda: clip_loss(model, loss_fn, pixels, texts).backward())
    split = SplitBatch(2, model.parameters())
    try:
        two = gradients(lambda: split.backward(clip_loss(model, loss_fn, pixels, texts, split)))
        again = gradients(lambda: split.backward(clip_loss(model, loss_fn, pixels, texts, split)))
    finally:
        split.close()
    model.zero_grad(set_to_none=True)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-4, msg=name)
        assert torch.equal(two[name], again[name]), f"{name}: the split step depends on thread timing"


def test_train_clip_with_worker_threads_is_repeatable_and_restores_threads(tokenizer_dir):
    threads = torch.get_num_threads()
    one, one_summary = _tiny_clip_training(tokenizer_dir, workers=1)
    two, two_summary = _tiny_clip_training(tokenizer_dir, workers=2)
    again, _ = _tiny_clip_training(tokenizer_dir, workers=2)
    assert torch.get_num_threads() == threads  # the workers' one intra-op thread is not left behind
    assert two_summary["first_loss"] == pytest.approx(one_summary["first_loss"], abs=1e-5)
    assert two_summary["last_loss"] == pytest.approx(one_summary["last_loss"], abs=1e-3)
    for (name, b), c in zip(two.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(b, c), f"{name} differs between two runs with worker threads"


def test_split_batch_refuses_misuse_and_bad_worker_counts(tmp_path):
    from mcad_world.parallel import SplitBatch
    from mcad_world.train import train_teachers
    from mcad_world.config import TeachersConfig

    with pytest.raises(ValueError, match="at least 2 workers"):
        SplitBatch(1, [])
    split = SplitBatch(2, [])
    with pytest.raises(RuntimeError, match="without a forward"):
        split.backward(torch.zeros((), requires_grad=True))
    split.close()
    with pytest.raises(ValueError, match="clip_workers"):
        train_teachers(TeachersConfig(data_dir=tmp_path, out_dir=tmp_path / "out", clip_workers=0))




@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda: {"clip_b": TowerShape(width=66, heads=4)},
         "clip_b's width must be a positive multiple of its 4 heads"),
        (lambda: {"blip": BlipRecipe(schedule=Schedule(steps=10, batch_size=1))},
         "blip schedule needs steps >= 1 and batch_size >= 2"),
        (lambda: {"clip_schedule": Schedule(steps=0)}, "clip schedule needs steps >= 1"),
    ],
)
def test_bad_teacher_shapes_and_schedules_are_refused_before_any_work(tmp_path, change, message):
    from mcad_world.train import train_teachers
    from mcad_world.config import TeachersConfig

    with pytest.raises(ValueError, match=message):  # the data directory is empty: no shard is read first
        train_teachers(TeachersConfig(data_dir=tmp_path, out_dir=tmp_path / "out", **change()))


def test_text_cut_to_the_longest_caption_gives_open_clips_features_and_gradients(tokenizer_dir):
    from transformers import AutoTokenizer

    from mcad_world.configs import build_clip, clip_model_cfg
    from mcad_world.train import encode_text_cut

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = build_clip(clip_model_cfg(_TINY_SHAPE, 32, len(tok), 24, tok.sep_token_id, no_ln_pre=True))
    texts = ["a red circle left of a blue square", "a square", "a small blue circle above a large red triangle"]
    ids = tok(texts, padding="max_length", max_length=24, return_tensors="pt")["input_ids"]
    longest = int((ids != tok.pad_token_id).sum(1).max())
    assert longest < 24  # there is padding to cut

    cut = encode_text_cut(model, ids)
    cut.sum().backward()
    cut_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model.encode_text(ids, normalize=True)
    full.sum().backward()
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        if name in cut_grads:
            torch.testing.assert_close(cut_grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    # the positional embeddings past the longest caption get no gradient from the cut pass
    assert cut_grads["positional_embedding"][longest:].abs().max() == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask_prob": 1.0}, "blip_mask_prob must be in"),
        ({"mined_negatives": -1}, "blip_mined_negatives must be >= 0"),
        ({"uniform_share": 1.5}, "blip_uniform_share must be in"),
        ({"random_negatives": -1}, "blip_random_negatives must be >= 0"),
        ({"vision_init": "clip_c"}, "blip_vision_init must be one of"),
        ({"vision_init": ""}, "blip_freeze_vision locks a trained image tower"),
        ({"split_negatives": -1}, "blip_split_negatives must be >= 0"),
        ({"freeze_vision": False, "split_negatives": 2}, "needs the locked image tower"),
        ({"shape": TowerShape(width=66, heads=4)}, "blip's width must be a positive multiple of its 4 heads"),
        ({"schedule": Schedule(steps=0)}, "blip schedule needs steps >= 1"),
    ],
)
def test_blip_recipe_refuses_a_bad_setting_when_made(change, message):
    with pytest.raises(ValueError, match=message):
        BlipRecipe(**change)


def _captured_teachers_config(monkeypatch, args: list[str]):
    """(result, config): `mcad teachers ARGS` with train_teachers replaced by one that keeps its config."""
    from click.testing import CliRunner

    from mcad_world import train as teacher_train
    from mcad_world.config import TEACHERS
    from pipeline.cli import main

    seen = []

    def keep(cfg):
        seen.append(cfg)
        entry = {"steps": 0, "first_loss": 0.0, "last_loss": 0.0, "seconds": 0.0, "spec": "none"}
        return {"skipped": {}, **{name: entry for name in TEACHERS}}

    monkeypatch.setattr(teacher_train, "train_teachers", keep)
    result = CliRunner().invoke(main, ["teachers", *args])
    return result, (seen[0] if seen else None)


def test_teachers_config_file_with_nested_blip_tables_and_command_line_overrides(tmp_path, monkeypatch):
    from mcad_world.config import TeachersConfig

    result, cfg = _captured_teachers_config(monkeypatch, ["--data", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert cfg == TeachersConfig(data_dir=tmp_path)  # no option given: the dataclasses' defaults

    config = tmp_path / "teachers.toml"
    config.write_text(f"""
data_dir = "{tmp_path.as_posix()}"
seed = 7

[clip_b]
width = 96
heads = 4
embed_dim = 96

[blip]
mined_negatives = 2
uniform_share = 0.25
vision_init = "clip_b"

[blip.schedule]
steps = 50
batch_size = 32
lr = 1e-3
""")
    result, cfg = _captured_teachers_config(monkeypatch, [
        "--config", str(config), "--blip-lr", "2e-3", "--no-blip-listwise", "--blip-split-negatives", "1",
        "--clip-steps", "5"])
    assert result.exit_code == 0, result.output
    assert cfg == TeachersConfig(
        data_dir=tmp_path,
        seed=7,
        clip_b=TowerShape(width=96, heads=4, embed_dim=96),
        clip_schedule=Schedule(steps=5),
        blip=BlipRecipe(mined_negatives=2, uniform_share=0.25, vision_init="clip_b", listwise=False,
                        split_negatives=1, schedule=Schedule(steps=50, batch_size=32, lr=2e-3)),
    )


@pytest.mark.parametrize(
    ("blip_table", "message"),
    [
        ('vision_init = ""', "blip_vision_init"),  # the recipe checks itself as the file is read
        ("mined_negative = 2", "unknown BlipRecipe keys ['mined_negative']"),
    ],
)
def test_teachers_config_file_with_a_bad_blip_recipe_is_a_usage_error(tmp_path, monkeypatch, blip_table, message):
    config = tmp_path / "teachers.toml"
    config.write_text(f"[blip]\n{blip_table}\n")
    result, cfg = _captured_teachers_config(monkeypatch, ["--config", str(config), "--data", str(tmp_path)])
    assert result.exit_code == 2 and cfg is None
    assert message in result.output


def test_command_line_recipe_options_are_checked_together(tmp_path, monkeypatch):
    """Options that are only sound together (unlocking the tower, dropping split negatives) apply in one step."""
    config = tmp_path / "teachers.toml"
    config.write_text("[blip]\nsplit_negatives = 2\n")
    result, cfg = _captured_teachers_config(monkeypatch, [
        "--config", str(config), "--data", str(tmp_path), "--no-blip-freeze-vision", "--blip-split-negatives", "0"])
    assert result.exit_code == 0, result.output
    assert not cfg.blip.freeze_vision and cfg.blip.split_negatives == 0
    result, cfg = _captured_teachers_config(monkeypatch, [
        "--config", str(config), "--data", str(tmp_path), "--no-blip-freeze-vision"])
    assert result.exit_code == 2 and cfg is None
    assert "needs the locked image tower" in result.output


def test_normalized_pixels_hand_out_the_rows_of_the_whole_split_normalized(tokenizer_dir):
    """uint8 images normalized as rows are taken: the same values (and the same trained CLIP) as a split
    normalized whole, at a quarter of the memory."""
    from transformers import AutoTokenizer

    from mcad_world.config import Schedule
    from mcad_world.configs import build_clip, clip_model_cfg
    from mcad_world.train import NormalizedPixels, normalize_pixels, train_clip

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    whole, lazy = normalize_pixels(images), NormalizedPixels(images)
    assert len(lazy) == 16
    rows = torch.tensor([3, 0, 15, 3])
    assert torch.equal(lazy[rows], whole[rows]) and torch.equal(lazy[2:7], whole[2:7])
    with pytest.raises(TypeError, match="uint8"):
        NormalizedPixels(whole)

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    table = tokenize_captions(tok, [[f"a red circle {i}", f"a blue square {i}"] for i in range(16)], 24)
    trained = []
    for pixels in (whole, lazy):
        torch.manual_seed(0)
        model = build_clip(clip_model_cfg(_TINY_SHAPE, 32, len(tok), 24, tok.sep_token_id, no_ln_pre=True),
                           output_dict=True)
        train_clip(model, pixels, table, Schedule(steps=2, batch_size=8, warmup=1), seed=0, desc="t")
        trained.append(model.state_dict())
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in trained[0])
