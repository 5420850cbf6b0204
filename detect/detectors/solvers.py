"""Closed-form fitting for the region detectors' post-hoc heads: linear SVMs and ridge regression.

R-CNN and SPP-Net fit their per-class SVMs (:meth:`detect.detectors.region.RegionDetector.fit_svms`) and box
regressors (:meth:`~detect.detectors.region.RegionDetector.fit_box_regressor`) outside of gradient training;
these are the two solvers they call. Both are plain tensor code on whatever device the inputs are on.

Decisions:

- SVMs: liblinear's ``-s 3`` (L2-regularised hinge loss, dual coordinate descent) as R-CNN's code used, with the
  bias as an extra regularised feature of value ``bias_multiplier``; all classes share one pass over the samples,
  and the stopping rule is a projected-gradient (KKT) bound computed in one matrix product per epoch.
- Ridge: the intercept is not regularised (centring removes it), and whichever of the primal or dual system is
  smaller is solved by Cholesky in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SVMSolution", "train_linear_svms", "fit_ridge"]


class SVMSolution(NamedTuple):
    """Linear SVMs ``score_k(x) = weight[k] @ x + bias[k]`` and the dual variables that give them."""

    weight: Tensor  # (K, D)
    bias: Tensor  # (K,)
    alpha: Tensor  # (N, K)
    epochs: int
    violation: float  # largest projected-gradient magnitude of the dual at the end


def _projected_gradient(x: Tensor, signs: Tensor, costs: Tensor, alpha: Tensor, w: Tensor) -> Tensor:
    """``(N, K)`` projected gradient of the dual (minimisation form): 0 everywhere exactly at the optimum."""
    grad = signs * (x @ w.T) - 1  # (N, K)
    projected = torch.where(alpha <= 0, grad.clamp(max=0), torch.where(alpha >= costs, grad.clamp(min=0), grad))
    return projected.masked_fill(costs <= 0, 0).abs()


def train_linear_svms(
    features: Tensor,
    signs: Tensor,
    costs: Tensor,
    *,
    bias_multiplier: float = 10.0,
    tol: float = 0.1,
    max_epochs: int = 1000,
    alpha: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SVMSolution:
    """K linear SVMs on shared features by dual coordinate descent (Hsieh et al. 2008, liblinear's ``-s 3``).

    Class ``k`` minimises ``1/2 (|w_k|^2 + beta_k^2) + sum_i costs[i, k] * max(0, 1 - signs[i, k] (w_k . x_i +
    B beta_k))`` with ``B = bias_multiplier``; its bias is ``b_k = B beta_k`` (regularised, as liblinear's ``-B``).
    ``features (N, D)``, ``signs (N, K)`` in {-1, +1}, ``costs (N, K) >= 0``: a zero cost leaves sample ``i`` out of
    class ``k``'s problem. The dual ``max sum alpha - 1/2 |sum alpha y x~|^2, 0 <= alpha <= cost`` is optimised
    one sample at a time by the exact (clipped Newton) step along each coordinate, for all classes together, every
    sample of some class's problem once per epoch in random order. After each epoch the projected gradient of every
    coordinate is computed in one matrix product; it stops when none exceeds ``tol``, i.e. when the KKT conditions
    hold within ``tol`` (liblinear's default, which R-CNN used, is 0.1 on a similar measure), or after
    ``max_epochs``. ``alpha`` warm-starts it (clipped into the new bounds). Use float64 for tight tolerances; works
    on any device (one small update per sample).
    """
    n, d = features.shape
    x = torch.cat([features, features.new_full((n, 1), bias_multiplier)], dim=1)  # (N, D+1)
    signs, costs = signs.to(x), costs.to(x)
    step = (1.0 / (x * x).sum(1)).tolist()  # (N,) inverse diagonal of the dual's Hessian
    alpha = costs.new_zeros(costs.shape) if alpha is None else torch.minimum(alpha.to(x).clamp(min=0), costs)
    w = (alpha * signs).T @ x  # (K, D+1)
    rows, row_signs, row_costs, row_alpha = x.unbind(0), signs.unbind(0), costs.unbind(0), alpha.unbind(0)  # views
    active = torch.nonzero((costs > 0).any(dim=1)).squeeze(1).cpu()  # (A,) samples in some class's problem
    epochs, violation = 0, _projected_gradient(x, signs, costs, alpha, w)
    while epochs < max_epochs and bool((violation > tol).any()):
        for i in active[torch.randperm(len(active), generator=generator)].tolist():
            x_i, y_i, a_i = rows[i], row_signs[i], row_alpha[i]
            new = a_i.add(1 - y_i * (w @ x_i), alpha=step[i]).clamp_(min=0)  # (K,) Newton step on each coordinate
            torch.minimum(new, row_costs[i], out=new)
            w.addr_(y_i * (new - a_i), x_i)  # (K, D+1) rank-1 update
            a_i.copy_(new)
        epochs += 1
        violation = _projected_gradient(x, signs, costs, alpha, w)
    worst = float(violation.max()) if violation.numel() else 0.0
    return SVMSolution(w[:, :d], w[:, d] * bias_multiplier, alpha, epochs, worst)


def fit_ridge(features: Tensor, targets: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Ridge regression with an unregularised intercept: ``min |X W + 1 b - Y|^2 + lam |W|^2``.

    ``features (N, D)``, ``targets (N, T)`` -> ``weight (T, D)``, ``bias (T,)``, in float64 on the inputs' device.
    Centring removes the intercept; then the primal ``(Xc^T Xc + lam I) W = Xc^T Yc`` is solved when ``N >= D``
    and the equivalent dual ``W = Xc^T (Xc Xc^T + lam I)^-1 Yc`` otherwise, so the system is never larger than
    ``min(N, D)`` squared. Both by Cholesky (the matrix is symmetric positive definite for ``lam > 0``).
    """
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    x, y = features.double(), targets.double()
    x_mean, y_mean = x.mean(0), y.mean(0)  # (D,), (T,)
    xc, yc = x - x_mean, y - y_mean  # (N, D), (N, T)
    n, d = xc.shape
    if n >= d:
        gram = xc.T @ xc + lam * torch.eye(d, dtype=x.dtype, device=x.device)  # (D, D)
        weight = torch.cholesky_solve(xc.T @ yc, torch.linalg.cholesky(gram))  # (D, T)
    else:
        gram = xc @ xc.T + lam * torch.eye(n, dtype=x.dtype, device=x.device)  # (N, N)
        weight = xc.T @ torch.cholesky_solve(yc, torch.linalg.cholesky(gram))  # (D, T)
    return weight.T, y_mean - x_mean @ weight

