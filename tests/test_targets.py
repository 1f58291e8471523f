import pytest
import torch

from mcad_cache.targets import _overwrite, candidates_in_batch, neighbor_batches, pick_texts, rebuild_target_logits

# A block of 4 images and 6 captions: images 0 and 1 have two captions each.
TEXT_IMAGE = torch.tensor([0, 0, 1, 1, 2, 3])
# The batch: images [2, 0, 1] with positive captions [4, 1, 2].
BATCH_IMAGES = torch.tensor([2, 0, 1])
BATCH_TEXTS = torch.tensor([4, 1, 2])
DUAL = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
I2T_IDS = torch.tensor([[1, 5], [0, 3], [2, 4], [4, 5]])  # image 1's list holds image 0's *other* caption
I2T_FUSED = torch.tensor([[10.0, 11.0], [12.0, 13.0], [14.0, 15.0], [16.0, 17.0]])
T2I_IDS = torch.tensor([[0, 1], [0, 3], [3, 2], [1, 2], [2, 1], [3, 0]])
T2I_FUSED = torch.tensor([[20.0, 21.0], [22.0, 23.0], [24.0, 25.0], [26.0, 27.0], [28.0, 29.0], [30.0, 31.0]])

# Written out by hand. i2t rows are images [2, 0, 1], columns texts [4, 1, 2]:
#   image 2 lists texts 2 (14), 4 (15) -> [15, 2, 14]; image 0 lists text 1 (10), 5 (absent) -> [4, 10, 6];
#   image 1 lists texts 0, 3 (both absent) -> the dual row [7, 8, 9].
EXPECTED_I2T = torch.tensor([[15.0, 2.0, 14.0], [4.0, 10.0, 6.0], [7.0, 8.0, 9.0]])
# t2i rows are texts [4, 1, 2], columns images [2, 0, 1], base = DUAL.T:
#   text 4 lists images 2 (28), 1 (29) -> [28, 4, 29]; text 1 lists 0 (22), 3 (absent) -> [2, 22, 8];
#   text 2 lists 3 (absent), 2 (25) -> [25, 6, 9].
EXPECTED_T2I = torch.tensor([[28.0, 4.0, 29.0], [2.0, 22.0, 8.0], [25.0, 6.0, 9.0]])


def _rebuild(i2t_fused=I2T_FUSED, t2i_fused=T2I_FUSED):
    return rebuild_target_logits(DUAL, BATCH_IMAGES, BATCH_TEXTS, TEXT_IMAGE, I2T_IDS, i2t_fused, T2I_IDS, t2i_fused)


def test_rebuild_against_hand_built_matrices():
    i2t, t2i = _rebuild()
    assert torch.equal(i2t, EXPECTED_I2T)
    assert torch.equal(t2i, EXPECTED_T2I)


def test_candidates_outside_the_batch_change_nothing():
    i2t_fused, t2i_fused = I2T_FUSED.clone(), T2I_FUSED.clone()
    # Every (anchor, candidate) slot whose anchor or candidate is not in the batch.
    i2t_fused[0, 1] = i2t_fused[1] = i2t_fused[3] = -99.0
    t2i_fused[0] = t2i_fused[3] = t2i_fused[5] = -77.0
    t2i_fused[1, 1] = t2i_fused[2, 0] = -55.0
    i2t, t2i = _rebuild(i2t_fused, t2i_fused)
    assert torch.equal(i2t, EXPECTED_I2T)
    assert torch.equal(t2i, EXPECTED_T2I)


def test_rebuild_without_any_hit_is_the_dual_logits():
    far = torch.full_like(I2T_IDS, 3)  # texts 3 and images 3 are never in the batch
    i2t, t2i = rebuild_target_logits(DUAL, BATCH_IMAGES, BATCH_TEXTS, TEXT_IMAGE, far, I2T_FUSED,
                                     torch.full_like(T2I_IDS, 3), T2I_FUSED)
    assert torch.equal(i2t, DUAL)
    assert torch.equal(t2i, DUAL.t())


def test_rebuild_rejects_texts_of_other_images():
    with pytest.raises(ValueError, match="not captions"):
        rebuild_target_logits(DUAL, BATCH_IMAGES, torch.tensor([4, 2, 1]), TEXT_IMAGE,
                              I2T_IDS, I2T_FUSED, T2I_IDS, T2I_FUSED)


def test_candidates_in_batch_hand_example():
    # i2t: image 2 -> 2 of [2, 4]; image 0 -> 1 of [1, 5]; image 1 -> 0 of [0, 3]: 3 of 6.
    # t2i: text 4 -> 2 of [2, 1]; text 1 -> 1 of [0, 3]; text 2 -> 1 of [3, 2]: 4 of 6.
    assert candidates_in_batch(BATCH_IMAGES, BATCH_TEXTS, I2T_IDS, T2I_IDS) == pytest.approx(7 / 12)


def _clique_block(n_cliques: int, size: int):
    """Images in disjoint cliques; each image's candidates are the (single) captions of its clique mates."""
    n = n_cliques * size
    text_image = torch.arange(n)
    clique = torch.arange(n) // size
    mates = [[j for j in range(n) if clique[j] == clique[i] and j != i] for i in range(n)]
    return torch.tensor(mates), text_image, clique


@pytest.mark.parametrize("batch_size", [4, 8])
def test_neighbor_batches_keep_cliques_together(batch_size):
    i2t_ids, text_image, clique = _clique_block(n_cliques=6, size=4)
    for seed in range(3):
        batches = neighbor_batches(i2t_ids, text_image, batch_size, torch.Generator().manual_seed(seed))
        assert sorted(torch.cat(batches).tolist()) == list(range(24))
        assert all(len(b) == batch_size for b in batches)
        for b in batches:  # whole cliques only
            counts = torch.bincount(clique[b], minlength=6)
            assert set(counts.tolist()) <= {0, 4}


def test_neighbor_batches_cover_once_with_ragged_last_batch():
    g = torch.Generator().manual_seed(0)
    n, k = 37, 5
    text_image = torch.arange(n).repeat_interleave(2)  # two captions per image
    i2t_ids = torch.randint(0, 2 * n, (n, k), generator=g)
    batches = neighbor_batches(i2t_ids, text_image, 8, g)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(n))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    assert all(b.dtype == torch.long for b in batches)
    # The first anchor of the first batch opened an empty batch: all its candidates' images came with it.
    anchor = batches[0][0]
    assert set(text_image[i2t_ids[anchor]].tolist()) <= set(batches[0].tolist())


def test_neighbor_batches_respects_neighbors():
    i2t_ids, text_image, _ = _clique_block(n_cliques=2, size=4)
    batches = neighbor_batches(i2t_ids, text_image, 4, torch.Generator().manual_seed(0), neighbors=1)
    first = batches[0]
    assert int(first[1]) == int(text_image[i2t_ids[first[0], 0]])  # only the top candidate was pulled
    assert sorted(torch.cat(batches).tolist()) == list(range(8))


def test_pick_texts_chooses_own_captions_uniformly():
    first = torch.tensor([0, 1, 4, 6])
    count = torch.tensor([1, 3, 2, 5])
    text_image = torch.arange(4).repeat_interleave(count)
    images = torch.tensor([3, 1, 0, 2])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        texts = pick_texts(images, first, count, g)
        assert torch.equal(text_image[texts], images)
        seen.update(texts.tolist())
    assert seen == set(range(11))


def _overwrite_by_comparison(base, cand_ids, cand_fused, columns):
    """The definition, slot by slot and column by column: the first listed slot of a column's id wins."""
    out = base.clone()
    for r in range(cand_ids.shape[0]):
        for c in range(len(columns)):
            slots = (cand_ids[r] == columns[c]).nonzero().flatten()
            if len(slots):
                out[r, c] = cand_fused[r, slots[0]]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_overwrite_matches_the_definition_with_repeats(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, k, n_columns, id_range = 9, 5, 7, 12
    base = torch.randn(rows, n_columns, generator=gen)
    cand_ids = torch.randint(0, id_range, (rows, k), generator=gen)
    cand_fused = torch.randn(rows, k, generator=gen)
    columns = torch.randint(0, id_range, (n_columns,), generator=gen)
    columns[-1] = columns[0]  # a repeated column
    cand_ids[0, 2] = cand_ids[0, 4] = columns[0]  # an id listed twice, and present in the batch
    expected = _overwrite_by_comparison(base, cand_ids, cand_fused, columns)
    assert not torch.equal(expected, base)
    assert torch.equal(_overwrite(base, cand_ids, cand_fused, columns), expected)
    assert torch.equal(_overwrite(base.t().contiguous().t(), cand_ids, cand_fused, columns), expected)


def test_neighbor_batches_with_zero_neighbors_is_a_random_permutation_and_one_pulls_the_top_candidate():
    """By hand: 4 images, one caption each (text j is image j's); image i's top candidate is caption (i + 1) % 4."""
    import torch

    from mcad_cache.targets import neighbor_batches

    text_image = torch.arange(4)
    i2t_ids = torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    alone = neighbor_batches(i2t_ids, text_image, 2, gen, neighbors=0)
    assert [b.tolist() for b in alone] == [order[:2], order[2:]]  # anchors in the random order, nothing pulled
    paired = neighbor_batches(i2t_ids, text_image, 2, torch.Generator().manual_seed(0), neighbors=1)
    first = order[0]
    assert paired[0].tolist() == [first, (first + 1) % 4]  # the anchor, then its top candidate's image
    assert sorted(torch.cat(paired).tolist()) == [0, 1, 2, 3]  # every image exactly once
