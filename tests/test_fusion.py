import pytest
import torch

from mcad_cache.fusion import FUSION_RULES, fuse

Z_DUAL = torch.tensor([[2.0, 1.0], [0.5, -1.0]])
Z_ITM = torch.tensor([[-4.0, 6.0], [1.5, 3.0]])


def test_rules_against_hand_computed_values():
    assert torch.equal(fuse("dual_only", Z_DUAL, Z_ITM, 0.3), Z_DUAL)
    # 2 + 0.5*-4 = 0, 1 + 0.5*6 = 4, 0.5 + 0.75 = 1.25, -1 + 1.5 = 0.5
    assert torch.allclose(fuse("itm_topk", Z_DUAL, Z_ITM, 0.5), torch.tensor([[0.0, 4.0], [1.25, 0.5]]))
    # 0.25*2 + 0.75*-4 = -2.5, 0.25*1 + 0.75*6 = 4.75, 0.125 + 1.125 = 1.25, -0.25 + 2.25 = 2.0
    assert torch.allclose(fuse("reconstruction", Z_DUAL, Z_ITM, 0.25), torch.tensor([[-2.5, 4.75], [1.25, 2.0]]))


def test_registry_names_and_errors():
    assert set(FUSION_RULES) >= {"dual_only", "itm_topk", "reconstruction"}
    with pytest.raises(KeyError, match="unknown fusion rule"):
        fuse("mystery", Z_DUAL, Z_ITM, 0.5)
    with pytest.raises(ValueError, match="0 <= a <= 1"):
        fuse("reconstruction", Z_DUAL, Z_ITM, 1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        fuse("itm_topk", Z_DUAL, Z_ITM[:1], 0.5)
