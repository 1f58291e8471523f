"""Stage-2 losses of the teacher-free student: pure functions that return dicts of named scalar terms.

The total objective is MCAD's ``L = itc + alpha * kd + beta * fd + gamma * ia`` (ARCHITECTURE.md, "Stage 2"):

* ``itc``: the student's own symmetric contrastive loss on the ground-truth pairs;
* ``kd``: distribution distillation, KL(target || student) over the in-batch i2t and t2i distributions;
* ``fd``: feature alignment of the projected student features to the integrated teacher features;
* ``ia``: interactive alignment (the MCAD paper's FA term), student features of one modality scored against
  teacher features of the other, trained towards the target distribution.

With several dual-stream teachers, AMMKD's adaptive weighting picks per-step teacher weights from the geometry
of their KD gradients with respect to the student logits (the min-norm / multiple-gradient-descent solution).

Conventions: ``student_logits`` and ``target_i2t`` are ``(B, B)`` with rows = images, columns = texts;
``target_t2i`` is ``(B, B)`` with rows = texts, columns = images (as :func:`mcad_cache.targets.rebuild_target_logits`
returns them), so the student's t2i logits are ``student_logits.T``. Targets and teacher features are constants
(cached, or frozen teachers in the online baseline): they are detached here so no gradient can leak into them.
Everything is computed in float32 (or float64 if given) so bf16/fp16 autocast logits do not lose the softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from mcad_student.choices import AMMKD_WEIGHTINGS, FD_KINDS, KD_DIRECTIONS, KD_KINDS

__all__ = [
    "LossWeights",
    "itc_loss",
    "kd_loss",
    "fd_loss",
    "ia_loss",
    "total_loss",
    "kd_gradients",
    "min_norm_weights",
    "confidence_weights",
    "ammkd_kd_loss",
]


@dataclass(frozen=True)
class LossWeights:
    """Weights and temperatures of ``L = itc + alpha * kd + beta * fd + gamma * ia``."""

    # A weight field names the term it weighs in its metadata ("term"); ``itc`` always has weight 1.
    # Re-derived against the shipped teachers (far stronger than the student alone; docs/results.md, "The
    # regime"): kd on both directions at alpha 1 (MCAD's) reached 64.9 test mean recall where kd on the
    # image-to-text rows at alpha 0.5 (the default chosen against weaker teachers) reached 57.8 (seed 0);
    # alpha 2 gave 64.9 as well.
    alpha: float = field(default=1.0, metadata={"term": "kd"})
    # fd at 4, ia at 1: fd at 4 passed fd at 1 on the mean of both worlds (default world: +0.8 / +1.9 / -0.6, mean
    # +0.7, sd 1.4 -> 0.4; second world: +1.3 / +1.0 / +0.9; fd at 8: worse), docs/results.md ("fd at 4"). fd and ia at 1 over fused_kd: "The
    # regime". Against teachers weaker than the student they cost 5.7 at weight 1 (docs/experiments.md).
    beta: float = field(default=4.0, metadata={"term": "fd"})
    gamma: float = field(default=1.0, metadata={"term": "ia"})
    # A setting names the terms it changes in its metadata ("terms"): with none of them in a mode it does nothing.
    kd_temperature: float = field(default=1.0, metadata={"terms": ("kd", "ia")})  # softens kd's target and student logits (and the ia target)
    ia_temperature: float = field(default=0.05, metadata={"terms": ("ia",)})  # temperature of the ia cross-modal logits
    fd_kind: str = field(default="cosine", metadata={"terms": ("fd",)})  # "cosine" (1 - cos, mean) or "mse" (mean squared error of L2-normalized features)
    # "full": KL over the whole row (MCAD). "negatives": KL over the non-matching pairs only (the true pair is
    # removed from both distributions, as in decoupled KD's non-target term), so kd never argues with itc
    # about which pair is true; it only passes on how the teachers rank the negatives.
    kd_kind: str = field(default="full", metadata={"terms": ("kd",)})
    # Which in-batch distributions kd matches: "both" (MCAD's), or only image-to-text / text-to-image rows.
    kd_direction: str = field(default="both", metadata={"terms": ("kd",)})
    # Which target distributions ia matches, as kd_direction for kd ("both": the paper's FA term).
    ia_direction: str = field(default="both", metadata={"terms": ("ia",)})
    # Mode ammkd's per-step teacher weights (choices.AMMKD_WEIGHTINGS); other modes ignore it.
    ammkd_weighting: str = field(default="min_norm", metadata={"terms": ("kd",)})

    def __post_init__(self) -> None:
        if self.fd_kind not in FD_KINDS:
            raise ValueError(f"fd_kind must be one of {FD_KINDS}, got {self.fd_kind!r}")
        if self.kd_kind not in KD_KINDS:
            raise ValueError(f"kd_kind must be one of {KD_KINDS}, got {self.kd_kind!r}")
        if self.ammkd_weighting not in AMMKD_WEIGHTINGS:
            raise ValueError(f"ammkd_weighting must be one of {AMMKD_WEIGHTINGS}, got {self.ammkd_weighting!r}")
        for name in ("kd_direction", "ia_direction"):
            if getattr(self, name) not in KD_DIRECTIONS:
                raise ValueError(f"{name} must be one of {KD_DIRECTIONS}, got {getattr(self, name)!r}")
        if self.kd_temperature <= 0 or self.ia_temperature <= 0:
            raise ValueError("temperatures must be positive")

    @staticmethod
    def weight_fields() -> dict[str, str]:
        """``{term: weight field}``, e.g. ``{"kd": "alpha", ...}``, from the fields' metadata."""
        return {f.metadata["term"]: f.name for f in fields(LossWeights) if "term" in f.metadata}

    def used_by(self, terms: tuple[str, ...] | None) -> LossWeights:
        """These weights as a mode with only ``terms`` (None: every term) uses them: the weights of the other
        terms are 0 and settings only they read are at their defaults, so two configs that train the same
        compare equal."""
        if terms is None:
            return self
        changes = {}
        for f in fields(self):
            if "term" in f.metadata and f.metadata["term"] not in terms:
                changes[f.name] = 0.0
            elif "terms" in f.metadata and not set(f.metadata["terms"]) & set(terms):
                changes[f.name] = f.default
        return replace(self, **changes)

    def term_weights(self) -> dict[str, float]:
        """``{term: weight}`` of every weighted term (``itc``'s weight is 1 and not listed)."""
        return {term: getattr(self, name) for term, name in self.weight_fields().items()}


def _float(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is: the losses' softmaxes are not done in half precision."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_rows(target_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """Row-mean KL(softmax(target / T) || softmax(student / T)).

    Written out rather than via ``F.kl_div(log_target=True)`` so that a target entry of ``-inf`` (probability 0)
    contributes 0 instead of ``0 * inf = nan``.
    """
    log_p = F.log_softmax(_float(target_logits.detach()) / temperature, dim=-1)
    log_q = F.log_softmax(_float(student_logits) / temperature, dim=-1)
    p = log_p.exp()
    # log_q is -inf only where the student row was masked, and there p is 0 too: keep those entries out of
    # the product (not just the sum), so no inf - inf reaches the backward pass.
    keep = p > 0
    per_entry = torch.where(keep, p * (log_p.masked_fill(~keep, 0.0) - log_q.masked_fill(~keep, 0.0)),
                            torch.zeros_like(p))
    return per_entry.sum(dim=-1).mean()


def _soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Row-mean ``-sum_j p_j log softmax(logits)_j``: cross-entropy to a soft target distribution."""
    log_q = F.log_softmax(_float(logits), dim=-1)
    per_entry = torch.where(target_probs > 0, target_probs * log_q, torch.zeros_like(log_q))
    return -per_entry.sum(dim=-1).mean()


def _check_square(student_logits: Tensor, target_i2t: Tensor, target_t2i: Tensor) -> None:
    if student_logits.ndim != 2 or target_i2t.shape != student_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and i2t target {tuple(target_i2t.shape)} "
                         "must be the same 2-D shape")
    if target_t2i.shape != student_logits.t().shape:
        raise ValueError(f"t2i target {tuple(target_t2i.shape)} must be the transpose shape of the student logits "
                         f"{tuple(student_logits.shape)} (rows = texts)")


def itc_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
    """Symmetric image-text contrastive loss on ground truth (CLIP's InfoNCE): ``{"itc": ...}``.

    ``image``, ``text``: ``(B, D)`` L2-normalized student embeddings, row ``i`` of each a positive pair.
    ``logit_scale`` is the multiplicative scale (already exponentiated, as open_clip's ``forward`` returns it).
    This is the student's own retrieval objective, kept beside the distillation terms so the student is anchored
    to the true pairs even where the teachers are wrong.
    """
    logits = logit_scale * (_float(image) @ _float(text).t())
    labels = torch.arange(logits.shape[0], device=logits.device)
    return {"itc": 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))}


def kd_loss(student_logits: Tensor, target_i2t: Tensor, target_t2i: Tensor, temperature: float,
            kind: str = "full", direction: str = "both") -> dict[str, Tensor]:
    """Distribution distillation (MCAD's KD term): ``{"kd": ...}``.

    ``KL(softmax(target / T) || softmax(student / T))`` averaged over rows, for i2t (``student_logits`` against
    ``target_i2t``) and t2i (``student_logits.T`` against ``target_t2i``), the mean of the two directions,
    multiplied by ``T**2``: Hinton et al.'s scaling, which keeps the gradient magnitude (which carries a 1/T)
    comparable across temperatures, so ``alpha`` does not need retuning when T changes.

    ``kind="negatives"``: the true pairs (the diagonal) are removed from target and student rows before the
    softmaxes, so the KL compares only how the negatives are ranked (decoupled KD's non-target term).

    ``direction="i2t"`` or ``"t2i"``: that direction's KL alone (times ``T**2``), so at the same ``alpha`` it
    pulls twice as hard as in ``"both"``; ``alpha / 2`` removes the other direction and changes nothing else.
    """
    _check_square(student_logits, target_i2t, target_t2i)
    if kind not in KD_KINDS:
        raise ValueError(f"unknown kd kind {kind!r}; expected one of {KD_KINDS}")
    if direction not in KD_DIRECTIONS:
        raise ValueError(f"unknown kd direction {direction!r}; expected one of {KD_DIRECTIONS}")
    if kind == "negatives":
        if student_logits.shape[0] < 2:
            raise ValueError("kd over negatives needs a batch of at least 2")
        eye = torch.eye(student_logits.shape[0], dtype=torch.bool, device=student_logits.device)
        student_logits = _float(student_logits).masked_fill(eye, float("-inf"))
        target_i2t = _float(target_i2t).masked_fill(eye, float("-inf"))
        target_t2i = _float(target_t2i).masked_fill(eye, float("-inf"))
    kls = []
    if direction in ("both", "i2t"):
        kls.append(_kl_rows(target_i2t, student_logits, temperature))
    if direction in ("both", "t2i"):
        kls.append(_kl_rows(target_t2i, student_logits.t(), temperature))
    return {"kd": sum(kls) / len(kls) * temperature**2}


def fd_loss(
    student_image: Tensor, student_text: Tensor, teacher_image: Tensor, teacher_text: Tensor, kind: str
) -> dict[str, Tensor]:
    """Feature alignment distillation (MCAD's feature distillation): ``{"fd": ...}``.

    ``student_*`` are the projected student features ``(B, E)`` (not necessarily normalized), ``teacher_*`` the
    integrated teacher features ``(B, E)``. Both are L2-normalized, because retrieval only uses directions.
    ``kind="cosine"``: ``mean(1 - cos)``; ``kind="mse"``: element-wise mean squared error of the normalized vectors,
    which equals ``mean(2 - 2 cos) / E``, so its scale is ``2 / E`` times the cosine one (tune ``beta`` for it).
    The image and text values are averaged.
    """
    if kind not in FD_KINDS:
        raise ValueError(f"unknown fd kind {kind!r}; expected one of {FD_KINDS}")
    for s, t in ((student_image, teacher_image), (student_text, teacher_text)):
        if s.shape != t.shape:
            raise ValueError(f"student features {tuple(s.shape)} and teacher features {tuple(t.shape)} differ")

    def one(student: Tensor, teacher: Tensor) -> Tensor:
        s = F.normalize(_float(student), dim=-1)
        t = F.normalize(_float(teacher.detach()), dim=-1)
        if kind == "cosine":
            return (1.0 - (s * t).sum(dim=-1)).mean()
        return F.mse_loss(s, t)

    return {"fd": 0.5 * (one(student_image, teacher_image) + one(student_text, teacher_text))}


def ia_loss(
    student_image: Tensor,
    student_text: Tensor,
    teacher_image: Tensor,
    teacher_text: Tensor,
    target_i2t: Tensor,
    target_t2i: Tensor,
    temperature: float,
    kd_temperature: float,
    direction: str = "both",
) -> dict[str, Tensor]:
    """Interactive alignment (the MCAD paper's FA term): ``{"ia": ...}``.

    The student's features are scored against the *teacher's* features of the other modality, so the student is
    pulled into the teacher's embedding space rather than only matching its similarity values:
    ``logits_a = norm(student_image) @ norm(teacher_text).T / temperature`` (i2t) and
    ``logits_b = norm(teacher_image) @ norm(student_text).T / temperature`` (i2t; its transpose is t2i).
    Soft cross-entropy of ``softmax(logits_a)`` rows against ``softmax(target_i2t / kd_temperature)`` and of
    ``softmax(logits_b.T)`` rows against ``softmax(target_t2i / kd_temperature)``; the mean of the two. Its minimum
    over the student, the targets' entropy, is reached when the two distributions match. ``direction="i2t"`` or
    ``"t2i"``: that cross-entropy alone (as :func:`kd_loss`'s ``direction``).
    """
    if direction not in KD_DIRECTIONS:
        raise ValueError(f"unknown ia direction {direction!r}; expected one of {KD_DIRECTIONS}")
    n_img, n_txt = student_image.shape[0], student_text.shape[0]
    if target_i2t.shape != (n_img, n_txt) or target_t2i.shape != (n_txt, n_img):
        raise ValueError(f"targets i2t {tuple(target_i2t.shape)} / t2i {tuple(target_t2i.shape)} do not match "
                         f"{n_img} images and {n_txt} texts")
    if teacher_image.shape != student_image.shape or teacher_text.shape != student_text.shape:
        raise ValueError("student and teacher features must have the same shapes")

    def norm(x: Tensor) -> Tensor:
        return F.normalize(_float(x), dim=-1)

    s_img, s_txt = norm(student_image), norm(student_text)
    t_img, t_txt = norm(teacher_image.detach()), norm(teacher_text.detach())
    logits_a = s_img @ t_txt.t() / temperature
    logits_b = t_img @ s_txt.t() / temperature
    halves = []
    if direction in ("both", "i2t"):
        halves.append(_soft_cross_entropy(logits_a, F.softmax(_float(target_i2t.detach()) / kd_temperature, dim=-1)))
    if direction in ("both", "t2i"):
        halves.append(_soft_cross_entropy(logits_b.t(), F.softmax(_float(target_t2i.detach()) / kd_temperature,
                                                                   dim=-1)))
    return {"ia": sum(halves) / len(halves)}


def total_loss(terms: dict[str, Tensor], w: LossWeights) -> Tensor:
    """``itc + alpha * kd + beta * fd + gamma * ia`` over the terms present in ``terms`` (a missing one adds 0).

    Other keys (e.g. ``"kd/0"``, ``"w/0"`` from :func:`ammkd_kd_loss`) are diagnostics and ignored. A dict with
    none of the four terms is a ValueError: a trainer with nothing to optimize is a bug, not a zero loss.
    """
    scale = {"itc": 1.0, **w.term_weights()}
    present = [scale[name] * terms[name] for name in scale if name in terms]
    if not present:
        raise ValueError(f"no loss term among {sorted(scale)} in {sorted(terms)}")
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def kd_gradients(student_logits: Tensor, targets: list[tuple[Tensor, Tensor]], temperature: float,
                 direction: str = "both") -> Tensor:
    """Closed-form ``d kd_loss / d student_logits`` for each teacher, flattened: ``(n_teachers, B * B)``.

    With ``q = softmax(s / T)`` and ``p = softmax(target / T)`` row-wise, ``d/ds`` of a row-mean KL is
    ``(q - p) / (T * rows)``; the t2i direction acts on ``s.T`` so its gradient is transposed back; the mean over
    the ``n`` directions kd uses (``direction``, as in :func:`kd_loss`) gives ``1/n`` and Hinton's ``T**2`` gives
    ``T``: for ``"both"``, ``grad = T / 2 * ((q_i2t - p_i2t) / B_i + (q_t2i - p_t2i).T / B_t)``. These are the
    per-teacher gradients AMMKD's adaptive weighting compares (no autograd, no graph: cheap and detached).
    """
    if direction not in KD_DIRECTIONS:
        raise ValueError(f"unknown kd direction {direction!r}; expected one of {KD_DIRECTIONS}")
    i2t, t2i = direction in ("both", "i2t"), direction in ("both", "t2i")
    with torch.no_grad():
        s = _float(student_logits.detach())
        q_i2t = F.softmax(s / temperature, dim=-1)
        q_t2i = F.softmax(s.t() / temperature, dim=-1)
        grads = []
        for target_i2t, target_t2i in targets:
            _check_square(s, target_i2t, target_t2i)
            g = torch.zeros_like(s)
            if i2t:
                g = g + (q_i2t - F.softmax(_float(target_i2t) / temperature, dim=-1)) / s.shape[0]
            if t2i:
                g = g + (q_t2i - F.softmax(_float(target_t2i) / temperature, dim=-1)).t() / s.shape[1]
            grads.append((temperature / (i2t + t2i) * g).reshape(-1))
        return torch.stack(grads)


def _min_norm_two(g1: Tensor, g2: Tensor) -> float:
    """Weight ``a`` on ``g1`` of ``argmin_a ||a g1 + (1 - a) g2||^2`` over ``[0, 1]`` (0.5 when ``g1 == g2``).

    ``||g1 - g2||^2`` is taken from the difference itself, not from Gram entries, so it is exactly 0 only when
    the gradients are equal (no cancellation). One device sync for the two numbers.
    """
    diff = g1 - g2
    denom, num = torch.stack([diff @ diff, -(diff @ g2)]).tolist()
    if denom == 0.0 or not math.isfinite(denom) or not math.isfinite(num):
        return 0.5
    return min(max(num / denom, 0.0), 1.0)


def _frank_wolfe(gram: list[list[float]], iterations: int) -> list[float]:
    """Min of ``w^T G w`` over the simplex by Frank-Wolfe with exact line search (Sener & Koltun 2018, MGDA-UB).

    Initialized, as in their ``MinNormSolver``, at the best two-teacher solution. Besides the plain FW (toward)
    step it takes *away* steps (Lacoste-Julien & Jaggi 2015) when they promise more decrease: plain FW zig-zags
    and converges sublinearly when the optimum lies on a face of the simplex (a teacher gets weight 0), the away
    step removes weight from a bad vertex exactly and converges linearly. Deterministic (first index on ties);
    stops early once the FW duality gap is at round-off level. Plain Python floats: the problem is ``n x n`` with
    a handful of teachers, where tiny torch ops would cost more than the arithmetic.
    """
    n = len(gram)
    best, w = math.inf, [1.0] + [0.0] * (n - 1)
    for i in range(n):
        for j in range(i + 1, n):
            # The pair closed form in Gram terms: a = (G_jj - G_ij) / (G_ii + G_jj - 2 G_ij).
            denom = gram[i][i] + gram[j][j] - 2 * gram[i][j]
            a = 0.5 if denom <= 0 else min(max((gram[j][j] - gram[i][j]) / denom, 0.0), 1.0)
            cost = a * a * gram[i][i] + (1 - a) ** 2 * gram[j][j] + 2 * a * (1 - a) * gram[i][j]
            if cost < best:
                best, w = cost, [0.0] * n
                w[i], w[j] = a, 1 - a
    tolerance = 1e-15 * (max(gram[k][k] for k in range(n)) or 1.0)
    for _ in range(iterations):
        grad = [sum(g * x for g, x in zip(row, w)) for row in gram]  # half the gradient of w^T G w
        value = sum(g * x for g, x in zip(grad, w))
        toward = min(range(n), key=lambda k: grad[k])
        away = max((k for k in range(n) if w[k] > 0), key=lambda k: grad[k])
        gap_fw, gap_away = value - grad[toward], grad[away] - value
        if gap_fw <= tolerance:
            break
        use_away = gap_away > gap_fw
        if use_away:
            direction = list(w)
            direction[away] -= 1.0
            step_max = w[away] / (1.0 - w[away]) if w[away] < 1.0 else math.inf
        else:
            direction = [-x for x in w]
            direction[toward] += 1.0
            step_max = 1.0
        g_dir = [sum(g * d for g, d in zip(row, direction)) for row in gram]
        curvature = sum(g * d for g, d in zip(g_dir, direction))
        slope = sum(g * d for g, d in zip(grad, direction))
        step = step_max if curvature <= 0 else min(max(-slope / curvature, 0.0), step_max)
        w = [max(x + step * d, 0.0) for x, d in zip(w, direction)]
        if use_away and step == step_max:
            w[away] = 0.0  # a drop step: remove the vertex exactly
        total = sum(w)
        w = [x / total for x in w]
    return w


def min_norm_weights(grads: Tensor, iterations: int = 1000) -> Tensor:
    """AMMKD's adaptive teacher weights: the convex ``w`` (``w >= 0``, ``sum 1``) minimizing ``||sum_t w_t g_t||^2``.

    This is the multiple-gradient-descent (MGDA) common descent direction over the teachers' KD gradients
    ``grads`` ``(n_teachers, P)``: teachers whose gradients agree share the weight, a teacher whose gradient
    dominates or conflicts is damped. Two teachers: the closed form
    ``a = clamp(((g2 - g1) . g2) / ||g1 - g2||^2, 0, 1)``, ``w = (a, 1 - a)``, and ``(0.5, 0.5)`` when
    ``g1 == g2``. More: Frank-Wolfe on the Gram matrix (:func:`_frank_wolfe`), at most ``iterations`` steps.
    Dot products are taken in float64 on ``grads.device``; only the ``n x n`` Gram matrix goes to the CPU for the
    solver. Returned on ``grads.device`` as float32 (float64 if ``grads`` is), detached.
    """
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be (n_teachers >= 1, P), got {tuple(grads.shape)}")
    out_dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
    n = grads.shape[0]
    g = grads.detach().to(torch.float64)
    if n == 1:
        w = torch.ones(1, dtype=torch.float64)
    elif n == 2:
        a = _min_norm_two(g[0], g[1])
        w = torch.tensor([a, 1.0 - a], dtype=torch.float64)
    else:
        w = torch.tensor(_frank_wolfe((g @ g.t()).tolist(), iterations), dtype=torch.float64)
    return w.to(device=grads.device, dtype=out_dtype)


def confidence_weights(targets: list[tuple[Tensor, Tensor]], temperature: float, direction: str = "both") -> Tensor:
    """Per-teacher weights ``softmax_t(-CE_t)``: ``CE_t`` is the mean cross-entropy of teacher ``t``'s target
    rows (softened by ``temperature``) against the batch's true pairs, over the rows ``direction`` names.

    A teacher whose targets put more probability on the truth weighs more (the confidence rule of
    multi-teacher KD, CA-MKD), unlike min-norm, which favours the teacher whose kd gradient is smallest,
    i.e. the one the student already agrees with. Row ``i`` of a target is anchor ``i``, whose true pair is
    column ``i`` (a batch's texts are its images' captions, in order).
    """
    if direction not in KD_DIRECTIONS:
        raise ValueError(f"direction must be one of {KD_DIRECTIONS}, got {direction!r}")
    losses = []
    for i2t, t2i in targets:
        rows = {"i2t": [i2t], "t2i": [t2i], "both": [i2t, t2i]}[direction]
        losses.append(torch.stack([
            F.cross_entropy(_float(r) / temperature, torch.arange(r.shape[0], device=r.device)) for r in rows
        ]).mean())
    return torch.softmax(-torch.stack(losses), dim=0)


def ammkd_kd_loss(
    student_logits: Tensor, targets: list[tuple[Tensor, Tensor]], temperature: float, weights: Tensor | None,
    direction: str = "both", weighting: str = "min_norm",
) -> dict[str, Tensor]:
    """Multi-teacher KD with AMMKD's adaptive weights: ``{"kd": sum_t w_t kd_t, "kd/<t>": kd_t, "w/<t>": w_t}``.

    ``targets`` holds one ``(target_i2t, target_t2i)`` pair per teacher, ``t = 0, 1, ...``. With ``weights=None``
    the weights are :func:`min_norm_weights` of the closed-form :func:`kd_gradients` (detached, recomputed every
    step, as AMMKD does), or with ``weighting="confidence"`` :func:`confidence_weights`; otherwise the given fixed weights ``(n_teachers,)`` are used as they are. ``"kd/<t>"``
    and ``"w/<t>"`` are detached diagnostics for logging; only ``"kd"`` carries gradient. ``direction``: the rows
    each teacher's kd matches, as in :func:`kd_loss` (the weights come from that same loss's gradients).
    """
    if not targets:
        raise ValueError("ammkd_kd_loss needs at least one teacher's targets")
    per_teacher = [kd_loss(student_logits, i2t, t2i, temperature, direction=direction)["kd"] for i2t, t2i in targets]
    if weights is None:
        with torch.no_grad():
            if weighting == "confidence":
                weights = confidence_weights(targets, temperature, direction)
            elif weighting == "min_norm":
                weights = min_norm_weights(kd_gradients(student_logits, targets, temperature, direction))
            else:
                raise ValueError(f"weighting must be one of {AMMKD_WEIGHTINGS}, got {weighting!r}")
    weights = weights.detach().to(device=per_teacher[0].device, dtype=per_teacher[0].dtype)
    if weights.shape != (len(targets),):
        raise ValueError(f"weights {tuple(weights.shape)} do not match {len(targets)} teachers")
    kd = (weights * torch.stack(per_teacher)).sum()
    out: dict[str, Tensor] = {"kd": kd}
    for t, value in enumerate(per_teacher):
        out[f"kd/{t}"] = value.detach()
        out[f"w/{t}"] = weights[t]
    return out
