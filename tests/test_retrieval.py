import pytest
import torch

from mcad_core.retrieval import (
    dual_stream_ranks,
    i2t_ranks,
    place_fine,
    recall_table,
    t2i_ranks,
)


def test_recall_hand_computed():
    # 3 images, 5 texts: image 0 owns texts 0,1; image 1 owns text 2; image 2 owns texts 3,4.
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0, 0.0],  # image 0: its caption 1 is best -> rank 0
            [0.7, 0.6, 0.5, 0.4, 0.0],  # image 1: texts 0,1 beat its caption 2 -> rank 2
            [0.9, 0.0, 0.0, 0.0, 0.2],  # image 2: text 0 beats caption 4 -> rank 1
        ]
    )
    i2t = i2t_ranks(scores, torch.arange(3), text_to_image)
    assert i2t.tolist() == [0, 2, 1]
    # text columns as queries. text 0: images 1 (0.7) and 2 (0.9) beat its own 0.1 -> rank 2;
    # text 3: image 1 (0.4) beats and image 0 ties its own 0.0 -> rank 2 (ties count against it).
    t2i = t2i_ranks(scores.t(), text_to_image)
    assert t2i.tolist() == [2, 0, 1, 2, 0]
    table = recall_table(i2t, t2i, ks=(1, 2))
    assert table["i2t_R@1"] == pytest.approx(100 / 3)
    assert table["i2t_R@2"] == pytest.approx(200 / 3)
    assert table["t2i_R@1"] == pytest.approx(40.0)
    assert table["t2i_R@2"] == pytest.approx(60.0)
    assert table["mean_recall"] == pytest.approx((100 / 3 + 200 / 3 + 40 + 60) / 4)


def test_ties_count_against_the_query():
    scores = torch.zeros(2, 2)
    ranks = i2t_ranks(scores, torch.arange(2), torch.tensor([0, 1]))
    assert ranks.tolist() == [1, 1]
    assert t2i_ranks(scores, torch.tensor([0, 1])).tolist() == [1, 1]


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="at least one caption"):
        i2t_ranks(torch.zeros(2, 1), torch.arange(2), torch.tensor([0]))


def test_blocked_ranks_equal_one_block():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(37, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(74, 8), dim=-1)
    text_to_image = torch.arange(37).repeat_interleave(2)
    small = dual_stream_ranks(images, texts, text_to_image, block=5)
    whole = dual_stream_ranks(images, texts, text_to_image, block=1000)
    assert torch.equal(small[0], whole[0]) and torch.equal(small[1], whole[1])
    sim = images @ texts.t()
    assert torch.equal(whole[0], i2t_ranks(sim, torch.arange(37), text_to_image))


def test_place_fine_puts_rescored_top_k_first_in_fine_order():
    coarse = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    top = coarse.topk(2, dim=1).indices
    assert top.tolist() == [[0, 1]]
    out = place_fine(coarse, top, torch.tensor([[-5.0, 3.0]]))  # fine order reverses the two coarse leaders
    order = out[0].argsort(descending=True).tolist()
    assert order == [1, 0, 2, 3]


def test_place_fine_keeps_coarse_order_below_huge_fine_scores_and_keeps_ties():
    coarse = torch.tensor([[0.50, 0.40, 0.30, 0.2000001, 0.2]])
    top = torch.tensor([[0, 1, 2]])
    out = place_fine(coarse, top, torch.tensor([[3e7, 3e7, 1e7]]))
    # the two tied fine scores stay tied (pessimistic ranks count a tie against the truth), above the third
    assert out[0, 0] == out[0, 1] > out[0, 2]
    # below every re-scored candidate, the coarse order survives, down to a 1e-7 difference
    assert out[0, 2] > out[0, 3] > out[0, 4]
