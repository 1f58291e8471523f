import pytest
import torch

from mcad_cache.topk import blocked_topk, fuse_embeddings


@pytest.mark.parametrize("query_block,key_block", [(7, 5), (3, 64), (100, 11)])
def test_blocked_topk_equals_brute_force(query_block, key_block):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(53, 16, generator=generator)
    keys = torch.randn(41, 16, generator=generator)
    values, indices = blocked_topk(queries, keys, k=6, query_block=query_block, key_block=key_block)
    brute_values, brute_indices = (queries @ keys.t()).topk(6, dim=1)
    assert torch.equal(indices, brute_indices)
    assert torch.allclose(values, brute_values, atol=1e-5)


def test_topk_larger_than_pool_is_an_error():
    with pytest.raises(ValueError, match="exceeds"):
        blocked_topk(torch.randn(2, 4), torch.randn(3, 4), k=4)


def test_fused_embeddings_give_the_weighted_similarity():
    generator = torch.Generator().manual_seed(1)
    a_q, a_k = torch.randn(5, 4, generator=generator), torch.randn(6, 4, generator=generator)
    b_q, b_k = torch.randn(5, 3, generator=generator), torch.randn(6, 3, generator=generator)
    fused = fuse_embeddings([a_q, b_q], [0.25, 0.75]) @ fuse_embeddings([a_k, b_k], [0.25, 0.75]).t()
    expected = 0.25 * a_q @ a_k.t() + 0.75 * b_q @ b_k.t()
    assert torch.allclose(fused, expected, atol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        fuse_embeddings([a_q], [-1.0])
