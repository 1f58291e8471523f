"""Stage-2 losses against values computed here by hand (plain Python loops and ``math``), plus their invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mcad_student.losses import (
    LossWeights,
    ammkd_kd_loss,
    fd_loss,
    ia_loss,
    itc_loss,
    kd_gradients,
    kd_loss,
    min_norm_weights,
    total_loss,
)

# ---------------------------------------------------------------- plain-Python references (no torch, no implementation)


def py_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def py_softmax(row: list[float]) -> list[float]:
    return [math.exp(x) for x in py_log_softmax(row)]


def py_matmul_t(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """a @ b.T"""
    return [[sum(x * y for x, y in zip(ra, rb)) for rb in b] for ra in a]


def py_transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


def py_normalize(rows: list[list[float]]) -> list[list[float]]:
    return [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows]


def py_kl_rows(target: list[list[float]], student: list[list[float]], temp: float) -> float:
    total = 0.0
    for t_row, s_row in zip(target, student):
        log_p = py_log_softmax([x / temp for x in t_row])
        log_q = py_log_softmax([x / temp for x in s_row])
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / len(target)


def py_soft_ce(logits: list[list[float]], probs: list[list[float]]) -> float:
    total = 0.0
    for l_row, p_row in zip(logits, probs):
        total -= sum(p * lq for p, lq in zip(p_row, py_log_softmax(l_row)))
    return total / len(logits)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- itc

IMAGE = [[1.0, 0.0], [0.0, 1.0]]
TEXT = [[0.6, 0.8], [0.8, -0.6]]


def test_itc_matches_hand_computation():
    scale = 2.5
    logits = [[scale * v for v in row] for row in py_matmul_t(IMAGE, TEXT)]
    ce_rows = [-py_log_softmax(logits[i])[i] for i in range(2)]
    ce_cols = [-py_log_softmax(py_transpose(logits)[j])[j] for j in range(2)]
    expected = 0.5 * (sum(ce_rows) / 2 + sum(ce_cols) / 2)
    got = itc_loss(t(IMAGE), t(TEXT), torch.tensor(scale))
    assert set(got) == {"itc"}
    assert got["itc"].item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- kd

STUDENT = [[2.0, 0.5, -1.0], [0.0, 1.5, 0.3], [-0.7, 0.2, 1.1]]
TARGET_I2T = [[3.0, 1.0, 0.0], [0.5, 2.0, 1.0], [-1.0, 0.0, 2.5]]
TARGET_T2I = [[2.0, 0.0, -0.5], [1.0, 3.0, 0.0], [0.2, 0.4, 1.8]]  # rows = texts


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_kd_matches_hand_computation(temp):
    i2t = py_kl_rows(TARGET_I2T, STUDENT, temp)
    t2i = py_kl_rows(TARGET_T2I, py_transpose(STUDENT), temp)
    expected = 0.5 * (i2t + t2i) * temp**2
    got = kd_loss(t(STUDENT), t(TARGET_I2T), t(TARGET_T2I), temp)
    assert set(got) == {"kd"}
    assert got["kd"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_one_direction_matches_hand_computation(temp):
    i2t = py_kl_rows(TARGET_I2T, STUDENT, temp)
    t2i = py_kl_rows(TARGET_T2I, py_transpose(STUDENT), temp)
    for direction, expected in (("i2t", i2t), ("t2i", t2i)):
        got = kd_loss(t(STUDENT), t(TARGET_I2T), t(TARGET_T2I), temp, direction=direction)["kd"]
        assert got.item() == pytest.approx(expected * temp**2, rel=1e-6), direction
    s = t(STUDENT)
    bumped = s.t().clone()
    bumped[1, 2] += 0.5
    assert kd_loss(s, s, bumped, 1.0, direction="i2t")["kd"].item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="kd direction"):
        kd_loss(s, s, s.t(), 1.0, direction="rows")
    with pytest.raises(ValueError, match="kd_direction"):
        LossWeights(kd_direction="rows")


def test_kd_is_zero_when_student_equals_targets():
    s = t(STUDENT)
    assert kd_loss(s, s, s.t(), 1.7)["kd"].item() == pytest.approx(0.0, abs=1e-12)
    bumped = s.t().clone()
    bumped[1, 2] += 0.5  # a constant added to a whole row would not change its softmax
    assert kd_loss(s, s, bumped, 1.7)["kd"].item() > 1e-4  # a t2i mismatch alone is seen


def test_kd_handles_zero_probability_targets():
    target = t(TARGET_I2T)
    target[0, 2] = -math.inf
    out = kd_loss(t(STUDENT).requires_grad_(), target, t(TARGET_T2I), 1.0)["kd"]
    out.backward()
    assert math.isfinite(out.item())


def _off_diagonal(rows: list[list[float]]) -> list[list[float]]:
    return [[x for j, x in enumerate(row) if j != i] for i, row in enumerate(rows)]


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_over_negatives_matches_hand_computation(temp):
    # By hand: drop each row's true pair (the diagonal) from both rows, then the same KL over what is left.
    i2t = py_kl_rows(_off_diagonal(TARGET_I2T), _off_diagonal(STUDENT), temp)
    t2i = py_kl_rows(_off_diagonal(TARGET_T2I), _off_diagonal(py_transpose(STUDENT)), temp)
    student = t(STUDENT).requires_grad_()
    got = kd_loss(student, t(TARGET_I2T), t(TARGET_T2I), temp, kind="negatives")["kd"]
    assert got.item() == pytest.approx(0.5 * (i2t + t2i) * temp**2, rel=1e-6)
    got.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad.diagonal(), torch.zeros(3))  # the true pairs are itc's business only
    assert (student.grad.abs() > 0).sum() == 6


def test_kd_over_negatives_ignores_the_true_pairs_logits():
    raised = t(TARGET_I2T)
    raised.fill_diagonal_(-50.0)  # a teacher that gets every true pair wrong: no effect on this term
    a = kd_loss(t(STUDENT), t(TARGET_I2T), t(TARGET_T2I), 1.0, kind="negatives")["kd"]
    b = kd_loss(t(STUDENT), raised, t(TARGET_T2I), 1.0, kind="negatives")["kd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    with pytest.raises(ValueError, match="kd kind"):
        kd_loss(t(STUDENT), t(TARGET_I2T), t(TARGET_T2I), 1.0, kind="diagonal")


# ---------------------------------------------------------------- fd

S_IMG = [[3.0, 0.0, 4.0], [1.0, 1.0, 0.0]]
S_TXT = [[0.0, 2.0, 0.0], [1.0, 2.0, 2.0]]
T_IMG = [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]
T_TXT = [[0.0, 1.0, 1.0], [2.0, 1.0, 2.0]]


def _py_fd(kind: str) -> float:
    def one(s_rows, t_rows):
        s_n, t_n = py_normalize(s_rows), py_normalize(t_rows)
        if kind == "cosine":
            return sum(1 - sum(a * b for a, b in zip(s, q)) for s, q in zip(s_n, t_n)) / len(s_n)
        sq = [(a - b) ** 2 for s, q in zip(s_n, t_n) for a, b in zip(s, q)]
        return sum(sq) / len(sq)

    return 0.5 * (one(S_IMG, T_IMG) + one(S_TXT, T_TXT))


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_fd_matches_hand_computation(kind):
    got = fd_loss(t(S_IMG), t(S_TXT), t(T_IMG), t(T_TXT), kind)
    assert set(got) == {"fd"}
    assert got["fd"].item() == pytest.approx(_py_fd(kind), rel=1e-6)


def test_fd_cosine_first_row_by_hand():
    # Image row 0: (3,0,4)/5 . (0,0,1) = 0.8 -> 0.2; row 1: (1,1,0)/sqrt2 . (1,0,0) = 1/sqrt2.
    img_only = fd_loss(t(S_IMG), t(T_TXT), t(T_IMG), t(T_TXT), "cosine")["fd"].item()
    assert img_only == pytest.approx(0.5 * (0.2 + (1 - 1 / math.sqrt(2))) / 2, rel=1e-9)


def test_fd_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown fd kind"):
        fd_loss(t(S_IMG), t(S_TXT), t(T_IMG), t(T_TXT), "l1")
    with pytest.raises(ValueError):
        LossWeights(fd_kind="l1")


# ---------------------------------------------------------------- ia

IA_S_IMG = [[1.0, 2.0], [2.0, -1.0]]
IA_S_TXT = [[0.5, 0.5], [-1.0, 3.0]]
IA_T_IMG = [[2.0, 1.0], [1.0, -1.0]]
IA_T_TXT = [[1.0, 1.0], [0.0, 2.0]]
IA_TARGET_I2T = [[2.0, -1.0], [0.5, 1.5]]
IA_TARGET_T2I = [[1.0, 0.0], [-0.5, 2.0]]


def test_ia_matches_hand_computation():
    temp, kd_temp = 0.5, 2.0
    logits_a = [[v / temp for v in row] for row in py_matmul_t(py_normalize(IA_S_IMG), py_normalize(IA_T_TXT))]
    logits_b = [[v / temp for v in row] for row in py_matmul_t(py_normalize(IA_T_IMG), py_normalize(IA_S_TXT))]
    p_i2t = [py_softmax([v / kd_temp for v in row]) for row in IA_TARGET_I2T]
    p_t2i = [py_softmax([v / kd_temp for v in row]) for row in IA_TARGET_T2I]
    i2t, t2i = py_soft_ce(logits_a, p_i2t), py_soft_ce(py_transpose(logits_b), p_t2i)
    args = (t(IA_S_IMG), t(IA_S_TXT), t(IA_T_IMG), t(IA_T_TXT), t(IA_TARGET_I2T), t(IA_TARGET_T2I), temp, kd_temp)
    got = ia_loss(*args)
    assert set(got) == {"ia"}
    assert got["ia"].item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)
    assert ia_loss(*args, direction="i2t")["ia"].item() == pytest.approx(i2t, rel=1e-6)
    assert ia_loss(*args, direction="t2i")["ia"].item() == pytest.approx(t2i, rel=1e-6)
    assert i2t != pytest.approx(t2i, rel=1e-3)  # the halves differ, so each check above can fail


def test_ia_minimum_is_where_distributions_match():
    gen = torch.Generator().manual_seed(0)
    b, e, temp, kd_temp = 4, 6, 0.3, 1.5
    s_img, s_txt, t_img, t_txt = (torch.randn(b, e, generator=gen, dtype=torch.float64) for _ in range(4))
    nrm = torch.nn.functional.normalize
    # Targets whose softmax at kd_temp is exactly the student's ia distribution in both directions.
    target_i2t = kd_temp * (nrm(s_img, dim=-1) @ nrm(t_txt, dim=-1).t() / temp)
    target_t2i = kd_temp * (nrm(t_img, dim=-1) @ nrm(s_txt, dim=-1).t() / temp).t()
    p_i2t, p_t2i = torch.softmax(target_i2t / kd_temp, -1), torch.softmax(target_t2i / kd_temp, -1)
    entropy = 0.5 * (-(p_i2t * p_i2t.log()).sum(-1).mean() - (p_t2i * p_t2i.log()).sum(-1).mean())

    def ia(si, st):
        return ia_loss(si, st, t_img, t_txt, target_i2t, target_t2i, temp, kd_temp)["ia"].item()

    matched = ia(s_img, s_txt)
    assert matched == pytest.approx(entropy.item(), rel=1e-9)  # soft CE = entropy + KL, KL = 0 here
    for _ in range(5):
        assert ia(s_img + 0.3 * torch.randn(b, e, generator=gen, dtype=torch.float64), s_txt) > matched
        assert ia(s_img, s_txt + 0.3 * torch.randn(b, e, generator=gen, dtype=torch.float64)) > matched


# ---------------------------------------------------------------- total


def test_total_loss_weights_and_missing_terms():
    w = LossWeights(alpha=0.5, beta=0.25, gamma=2.0)
    terms = {"itc": t(1.0), "kd": t(2.0), "fd": t(3.0), "ia": t(4.0), "kd/0": t(100.0), "w/0": t(100.0)}
    assert total_loss(terms, w).item() == pytest.approx(1.0 + 0.5 * 2.0 + 0.25 * 3.0 + 2.0 * 4.0)
    assert total_loss({"kd": t(2.0), "w/0": t(9.0)}, w).item() == pytest.approx(1.0)
    assert total_loss({"itc": t(1.5), "ia": t(1.0)}, w).item() == pytest.approx(3.5)
    with pytest.raises(ValueError):
        total_loss({"kd/0": t(1.0)}, w)


# ---------------------------------------------------------------- kd gradients


@pytest.mark.parametrize("direction", ["both", "i2t", "t2i"])
@pytest.mark.parametrize("temp", [1.0, 2.5, 0.4])
def test_kd_gradients_match_autograd(temp, direction):
    gen = torch.Generator().manual_seed(1)
    b = 5
    student = torch.randn(b, b, generator=gen, dtype=torch.float64) * 2
    targets = [(torch.randn(b, b, generator=gen, dtype=torch.float64) * 2,
                torch.randn(b, b, generator=gen, dtype=torch.float64) * 2) for _ in range(3)]
    got = kd_gradients(student, targets, temp, direction)
    assert got.shape == (3, b * b)
    for i, (i2t, t2i) in enumerate(targets):
        s = student.clone().requires_grad_()
        (expected,) = torch.autograd.grad(kd_loss(s, i2t, t2i, temp, direction=direction)["kd"], s)
        torch.testing.assert_close(got[i], expected.reshape(-1), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- min-norm weights


def _objective(weights: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """||sum_t w_t g_t||^2 for each row of ``weights`` (K, n)."""
    return ((weights @ grads) ** 2).sum(-1)


TWO_TEACHER_CASES = {
    "interior": ([1.0, 0.2, -0.5], [-0.4, 1.0, 0.3]),
    "clamped_to_1": ([0.1, 0.0, 0.0], [1.0, 1.0, 0.0]),  # g1 is nearly the foot of the perpendicular: a > 1
    "clamped_to_0": ([1.0, 1.0, 0.0], [0.1, 0.0, 0.0]),
    "opposite": ([2.0, 0.0, 0.0], [-1.0, 0.0, 0.0]),  # the segment passes through 0: a = 1/3
}


@pytest.mark.parametrize("case", sorted(TWO_TEACHER_CASES))
def test_min_norm_two_teachers_matches_grid(case):
    grads = t(list(TWO_TEACHER_CASES[case]))
    w = min_norm_weights(grads)
    a_grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    best = a_grid[torch.argmin(_objective(torch.stack([a_grid, 1 - a_grid], 1), grads))]
    assert w.shape == (2,)
    assert w[0].item() == pytest.approx(best.item(), abs=1e-3)
    assert w.sum().item() == pytest.approx(1.0) and (w >= 0).all()
    if case == "clamped_to_1":
        assert w.tolist() == [1.0, 0.0]
    if case == "clamped_to_0":
        assert w.tolist() == [0.0, 1.0]


def test_min_norm_two_equal_gradients_split_evenly():
    g = t([0.3, -1.0, 2.0])
    assert min_norm_weights(torch.stack([g, g])).tolist() == [0.5, 0.5]
    assert min_norm_weights(torch.stack([g, g]).float()).dtype == torch.float32


def _simplex_grid(steps: int) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    i, j = i[keep], j[keep]
    return torch.stack([i, j, steps - i - j], 1).to(torch.float64) / steps


THREE_TEACHER_CASES = {
    "random": None,
    "face_optimum": ([1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [3.0, 3.0, 0.5, 0.0]),  # w_3 = 0 at the optimum
    "vertex_optimum": ([0.1, 0.1, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [2.0, 1.0, 0.5, 0.0]),  # w = (1, 0, 0)
    "contains_zero": ([1.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]),  # optimum 0, interior
    "collinear": ([1.0, 2.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0], [-0.5, -1.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("case", sorted(THREE_TEACHER_CASES))
def test_min_norm_three_teachers_near_grid_optimum(case):
    if THREE_TEACHER_CASES[case] is None:
        grads = torch.randn(3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    else:
        grads = t(list(THREE_TEACHER_CASES[case]))
    w = min_norm_weights(grads)
    assert w.shape == (3,)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-12)
    grid_best = _objective(_simplex_grid(400), grads).min().item()
    assert _objective(w[None], grads).item() == pytest.approx(grid_best, abs=1e-4)
    assert torch.equal(w, min_norm_weights(grads))  # deterministic


def test_min_norm_many_teachers_random_is_feasible_and_not_worse_than_vertices():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = torch.randn(5, 8, generator=gen, dtype=torch.float64)
        w = min_norm_weights(grads)
        assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-12)
        for n_pick in (1, 2):  # never worse than any vertex or edge midpoint
            for pick in itertools.combinations(range(5), n_pick):
                v = torch.zeros(5, dtype=torch.float64)
                v[list(pick)] = 1.0 / n_pick
                assert _objective(w[None], grads).item() <= _objective(v[None], grads).item() + 1e-12


# ---------------------------------------------------------------- ammkd


def _teachers(b: int = 4, n: int = 2, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(b, b, generator=gen)
    targets = [(torch.randn(b, b, generator=gen) * 2, torch.randn(b, b, generator=gen) * 2) for _ in range(n)]
    return student, targets


def test_ammkd_fixed_weights_select_teacher():
    student, targets = _teachers()
    out = ammkd_kd_loss(student, targets, 2.0, torch.tensor([1.0, 0.0]))
    expected = kd_loss(student, *targets[0], 2.0)["kd"]
    torch.testing.assert_close(out["kd"], expected)
    assert set(out) == {"kd", "kd/0", "kd/1", "w/0", "w/1"}
    torch.testing.assert_close(out["kd/1"], kd_loss(student, *targets[1], 2.0)["kd"])
    assert out["w/0"].item() == 1.0 and out["w/1"].item() == 0.0


@pytest.mark.parametrize("direction", ["both", "i2t"])
def test_ammkd_adaptive_weights_are_min_norm_and_differentiable(direction):
    student, targets = _teachers(n=3)
    s = student.clone().requires_grad_()
    out = ammkd_kd_loss(s, targets, 1.0, None, direction)
    w = torch.stack([out[f"w/{i}"] for i in range(3)])
    torch.testing.assert_close(w, min_norm_weights(kd_gradients(student, targets, 1.0, direction)))
    torch.testing.assert_close(out["kd/0"], kd_loss(student, *targets[0], 1.0, direction=direction)["kd"])
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6) and not w.requires_grad
    torch.testing.assert_close(out["kd"], sum(w[i] * out[f"kd/{i}"] for i in range(3)))
    (grad,) = torch.autograd.grad(out["kd"], s)
    # The weights are constants, so the gradient is the weighted sum of the per-teacher gradients.
    torch.testing.assert_close(grad.reshape(-1), w @ kd_gradients(student, targets, 1.0, direction),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        ammkd_kd_loss(s, targets, 1.0, torch.tensor([0.5, 0.5]))


def test_used_by_zeroes_absent_terms_and_resets_the_settings_only_they_read():
    w = LossWeights(alpha=0.7, beta=0.2, gamma=0.3, kd_temperature=2.0, ia_temperature=0.1, fd_kind="mse",
                    kd_kind="negatives", kd_direction="both")
    assert w.used_by(None) == w
    assert w.used_by(()) == LossWeights(alpha=0.0, beta=0.0, gamma=0.0)
    kd_only = w.used_by(("kd",))
    assert (kd_only.alpha, kd_only.beta, kd_only.gamma) == (0.7, 0.0, 0.0)
    assert (kd_only.kd_temperature, kd_only.kd_kind, kd_only.kd_direction) == (2.0, "negatives", "both")
    assert (kd_only.ia_temperature, kd_only.fd_kind) == (LossWeights().ia_temperature, LossWeights().fd_kind)
    assert w.used_by(("ia",)).kd_temperature == 2.0  # ia's targets are softened by kd_temperature too


def test_confidence_weights_by_hand():
    """Teacher A puts e^2/(e^2+1) on each true pair, teacher B a uniform 1/2: w = softmax(-CE)."""
    import math

    from mcad_student.losses import confidence_weights

    a = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    b = torch.zeros(2, 2)
    ce_a, ce_b = math.log(1 + math.exp(-2.0)), math.log(2.0)
    w_a = math.exp(-ce_a) / (math.exp(-ce_a) + math.exp(-ce_b))
    weights = confidence_weights([(a, a), (b, b)], temperature=1.0)
    torch.testing.assert_close(weights, torch.tensor([w_a, 1 - w_a]), rtol=0, atol=1e-6)
    assert weights[0] > weights[1]
    # Temperature 2 halves the logits: CE_a = log(1 + e^-1).
    ce_a2 = math.log(1 + math.exp(-1.0))
    w_a2 = math.exp(-ce_a2) / (math.exp(-ce_a2) + math.exp(-ce_b))
    torch.testing.assert_close(confidence_weights([(a, a), (b, b)], 2.0)[0], torch.tensor(w_a2), rtol=0, atol=1e-6)
    # One direction only: teacher B good on t2i, bad on i2t; i2t alone must favour A, t2i alone B.
    swapped = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    assert confidence_weights([(a, swapped), (b, a)], 1.0, "i2t")[0] > 0.5
    assert confidence_weights([(a, swapped), (b, a)], 1.0, "t2i")[1] > 0.5


def test_ammkd_confidence_weighting_is_used_and_unknown_rules_refused():
    from mcad_student.losses import ammkd_kd_loss, confidence_weights

    torch.manual_seed(0)
    student = torch.randn(4, 4)
    targets = [(torch.randn(4, 4) * 3, torch.randn(4, 4) * 3), (torch.randn(4, 4), torch.randn(4, 4))]
    out = ammkd_kd_loss(student, targets, 1.0, None, "both", weighting="confidence")
    expected = confidence_weights(targets, 1.0, "both")
    torch.testing.assert_close(torch.stack([out["w/0"], out["w/1"]]), expected)
    with pytest.raises(ValueError, match="weighting must be one of"):
        ammkd_kd_loss(student, targets, 1.0, None, "both", weighting="best")
