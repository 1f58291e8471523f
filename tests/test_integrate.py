import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mcad_cache.integrate import (
    IntegrationConfig,
    IntegrationModule,
    integrated_features,
    integration_losses,
    train_integration,
)


def _linear(layer: torch.nn.Linear, x: list[float]) -> list[float]:
    w, b = layer.weight.tolist(), layer.bias.tolist()
    return [sum(w[o][i] * x[i] for i in range(len(x))) + b[o] for o in range(len(b))]


def _branch_by_hand(branch, dual: list[float], single: list[float]) -> list[float]:
    p_d, p_s = _linear(branch.dual, dual), _linear(branch.single, single)
    g = [1.0 / (1.0 + math.exp(-z)) for z in _linear(branch.gate, p_d + p_s)]
    mixed = [g[c] * p_d[c] + (1.0 - g[c]) * p_s[c] for c in range(len(g))]
    norm = math.sqrt(sum(v * v for v in mixed))
    return [v / norm for v in mixed]


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


def _kl_rows(target: list[list[float]], student: list[list[float]], t: float) -> float:
    total = 0.0
    for tr, sr in zip(target, student):
        lp, lq = _log_softmax([v / t for v in tr]), _log_softmax([v / t for v in sr])
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    return total / len(target)


def test_integration_losses_against_explicit_loops():
    torch.manual_seed(3)
    model = IntegrationModule(dual_dim=3, single_dim=2, dim=4)
    B, temperature, kl_weight, kl_t = 3, 0.2, 0.7, 2.0
    batch = {
        "dual_image": torch.randn(B, 3), "single_image": torch.randn(B, 2),
        "dual_text": torch.randn(B, 3), "single_text": torch.randn(B, 2),
        "i2t_target": torch.randn(B, B) * 3, "t2i_target": torch.randn(B, B) * 3,
    }
    out = integration_losses(model, batch, temperature, kl_weight, kl_t)

    img = [_branch_by_hand(model.image, batch["dual_image"][i].tolist(), batch["single_image"][i].tolist())
           for i in range(B)]
    txt = [_branch_by_hand(model.text, batch["dual_text"][j].tolist(), batch["single_text"][j].tolist())
           for j in range(B)]
    s = [[sum(a * b for a, b in zip(img[i], txt[j])) / temperature for j in range(B)] for i in range(B)]
    s_t = [[s[j][i] for j in range(B)] for i in range(B)]
    i2t_ce = -sum(_log_softmax(s[i])[i] for i in range(B)) / B
    t2i_ce = -sum(_log_softmax(s_t[j])[j] for j in range(B)) / B
    contrastive = (i2t_ce + t2i_ce) / 2
    kl = (_kl_rows(batch["i2t_target"].tolist(), s, kl_t) + _kl_rows(batch["t2i_target"].tolist(), s_t, kl_t)) / 2

    assert out["contrastive"].item() == pytest.approx(contrastive, rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["loss"].item() == pytest.approx(contrastive + kl_weight * kl, rel=1e-5)


def test_kl_is_zero_when_student_matches_target():
    torch.manual_seed(0)
    model = IntegrationModule(3, 2, 4)
    batch = {"dual_image": torch.randn(4, 3), "single_image": torch.randn(4, 2),
             "dual_text": torch.randn(4, 3), "single_text": torch.randn(4, 2)}
    with torch.no_grad():
        img, txt = model(batch["dual_image"], batch["single_image"], batch["dual_text"], batch["single_text"])
    logits = img @ txt.t() / 0.1
    out = integration_losses(model, batch | {"i2t_target": logits + 5.0, "t2i_target": logits.t()}, 0.1, 1.0, 1.0)
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)  # a constant shift is renormalized away


def test_gate_outputs_are_unit_vectors():
    torch.manual_seed(1)
    model = IntegrationModule(dual_dim=8, single_dim=5, dim=6)
    img, txt = model(torch.randn(7, 8) * 10, torch.randn(7, 5), torch.randn(9, 8), torch.randn(9, 5) * 0.01)
    assert img.shape == (7, 6) and txt.shape == (9, 6)
    assert torch.allclose(img.norm(dim=-1), torch.ones(7), atol=1e-6)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(9), atol=1e-6)
    # Image and text branches have their own weights.
    ones = (torch.ones(1, 8), torch.ones(1, 5))
    assert not torch.allclose(model.images(*ones), model.texts(*ones))


def _synthetic_block(n: int = 64, captions: int = 2, k: int = 5, seed: int = 0) -> dict:
    """Captions are noisy copies of their image's latent; the dual teacher sees a noisy view of it."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 6, generator=g)
    text_image = torch.arange(n).repeat_interleave(captions)
    text_latent = latent[text_image] + 0.3 * torch.randn(len(text_image), 6, generator=g)
    to_dual, to_single = torch.randn(6, 8, generator=g), torch.randn(6, 5, generator=g)
    dual_image = F.normalize(latent @ to_dual + 0.5 * torch.randn(n, 8, generator=g), dim=-1)
    dual_text = F.normalize(text_latent @ to_dual + 0.5 * torch.randn(len(text_image), 8, generator=g), dim=-1)
    scale = 10.0
    sim = scale * dual_image @ dual_text.t()
    i2t_fused, i2t_ids = sim.topk(k, dim=1)
    t2i_fused, t2i_ids = sim.t().topk(k, dim=1)
    return {
        "dual_image": dual_image.half(), "single_image": latent @ to_single,
        "dual_text": dual_text.half(), "single_text": text_latent @ to_single,
        "text_image": text_image, "first": torch.arange(n) * captions, "count": torch.full((n,), captions),
        "i2t_ids": i2t_ids, "i2t_fused": i2t_fused + 1.0, "t2i_ids": t2i_ids, "t2i_fused": t2i_fused + 1.0,
        "dual_scale": scale,
    }


def _full_loss(model, f: dict, cfg: IntegrationConfig) -> float:
    """Loss over all images with their first captions, targets = dual logits (a fixed yardstick)."""
    texts = f["first"]
    dual = f["dual_scale"] * f["dual_image"].float() @ f["dual_text"][texts].float().t()
    batch = {"dual_image": f["dual_image"], "single_image": f["single_image"],
             "dual_text": f["dual_text"][texts], "single_text": f["single_text"][texts],
             "i2t_target": dual, "t2i_target": dual.t()}
    with torch.no_grad():
        return integration_losses(model, batch, cfg.temperature, cfg.kl_weight, cfg.kl_temperature)["loss"].item()


def test_train_integration_reduces_the_loss():
    features = _synthetic_block()
    cfg = IntegrationConfig(dim=16, steps=120, batch_size=16, lr=1e-2, temperature=0.1, seed=0)
    untrained, empty = train_integration(features, replace(cfg, steps=0), progress=False)
    assert math.isnan(empty["first_loss"]) and empty["steps"] == 0
    model, summary = train_integration(features, cfg, progress=False)
    assert not model.training
    assert set(summary) == {"first_loss", "last_loss", "steps", "seconds"} and summary["steps"] == 120
    assert summary["last_loss"] < summary["first_loss"]
    assert _full_loss(model, features, cfg) < 0.8 * _full_loss(untrained, features, cfg)

    again, summary_again = train_integration(features, cfg, progress=False)  # seeded: reproducible
    assert summary_again["last_loss"] == summary["last_loss"]
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))

    img, txt = integrated_features(model, features["dual_image"], features["single_image"],
                                   features["dual_text"], features["single_text"], batch=10)
    assert img.shape == (64, 16) and txt.shape == (128, 16) and img.dtype == torch.float32
    ref_img, ref_txt = model(features["dual_image"], features["single_image"],
                             features["dual_text"], features["single_text"])
    assert torch.allclose(img, ref_img, atol=1e-6) and torch.allclose(txt, ref_txt, atol=1e-6)


def test_train_integration_names_missing_features():
    features = _synthetic_block()
    del features["dual_scale"]
    with pytest.raises(KeyError, match="dual_scale"):
        train_integration(features, IntegrationConfig(steps=1), progress=False)
