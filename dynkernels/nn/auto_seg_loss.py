"""Auto Seg-Loss (arXiv 2010.07930) as a drop-in loss module, and the paper's
search over the surrogate's parameters.

* ``SurrogateSegLoss(metric="miou", theta=None, ...)``: the official
  ``AutoSegLoss`` (``loss_weight * (1 - surrogate metric)``), theta defaulting
  to the metric's official retraining parameters.
* ``search_surrogate(reward_fn, *, metric="miou", ...)``: the official
  PPO-style search (ASL_search/autoloss_ppo_bezier.py): each coordinate of
  the raw parameters u ~ TruncatedNormal(mu, sigma, [0, 1]); the control
  points are ``monotone_control_points(u)`` (p_k = u_k (1 - p_{k-1}) +
  p_{k-1}, per coordinate, along each curve); each round samples
  ``samples`` u (the first is mu itself with the "mu" baseline), calls
  ``reward_fn(control_points)`` (train a proxy model with that surrogate,
  return its validation metric), and runs ``updates`` Adam steps on mu's
  logit with the clipped ratio objective, per coordinate as the official
  code does: ``-mean_samples(min(r A, clip(r, 1 -+ eps) A)).sum()``, with
  A = reward - baseline and r = exp(log p(u) - log p_old(u)). sigma is fixed
  (the official optimiser holds mu's logit only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from ..ops.auto_seg_loss import CURVES, SURROGATE_PRESETS, check_theta

__all__ = ["SearchResult", "SurrogateSegLoss", "TruncatedNormal", "monotone_control_points", "search_surrogate"]


class SurrogateSegLoss(nn.Module):
    """``loss_weight * surrogate_seg_loss(logits, target, theta, metric=...)``;
    see :func:`dynkernels.ops.surrogate_seg_loss`. theta is a hyperparameter
    (a tuple of floats, checked monotone once here), not a buffer: plain
    numbers keep torch.compile's graph whole."""

    def __init__(
        self,
        metric: str = "miou",
        theta=None,
        *,
        ignore_index: int = 255,
        drop_bg: bool | None = None,
        boundary_tolerance: int = 5,
        eps: float = 1e-8,
        loss_weight: float = 1.0,
        check_labels=True,
        backend=None,
    ) -> None:
        super().__init__()
        metric = metric.lower()
        if metric not in SURROGATE_PRESETS:
            raise ValueError(f"metric must be one of {tuple(SURROGATE_PRESETS)}, got {metric!r}")
        self.metric = metric
        preset = SURROGATE_PRESETS[metric]
        self.theta = check_theta(preset["theta"] if theta is None else theta, CURVES[metric])
        self.ignore_index = ignore_index
        self.drop_bg = preset["drop_bg"] if drop_bg is None else bool(drop_bg)
        self.boundary_tolerance = boundary_tolerance
        self.eps = eps
        self.loss_weight = loss_weight
        self.check_labels = check_labels
        self.backend = backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = ops.surrogate_seg_loss(
            logits,
            target,
            self.theta,
            metric=self.metric,
            ignore_index=self.ignore_index,
            drop_bg=self.drop_bg,
            boundary_tolerance=self.boundary_tolerance,
            eps=self.eps,
            check_labels=self.check_labels,
            backend=self.backend,
        )
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (
            f"metric={self.metric!r}, curves={CURVES[self.metric]}, ignore_index={self.ignore_index}, "
            f"drop_bg={self.drop_bg}, boundary_tolerance={self.boundary_tolerance}, loss_weight={self.loss_weight}"
        )


def monotone_control_points(u: torch.Tensor, curves: int) -> torch.Tensor:
    """The official reparameterisation: raw u (..., curves * (4M - 2)) in [0, 1]
    to monotone control points, p_k = u_k (1 - p_{k-1}) + p_{k-1} for each x
    and y coordinate along each curve."""
    per_curve = u.shape[-1] // curves
    points = u.reshape(*u.shape[:-1], curves, per_curve // 2, 2).clone()
    for k in range(1, points.shape[-2]):
        points[..., k, :] = points[..., k, :] * (1 - points[..., k - 1, :]) + points[..., k - 1, :]
    return points.reshape(u.shape)


class TruncatedNormal:
    """N(mu, sigma) truncated to [low, high], per coordinate; sampling by the
    inverse CDF and log-density as the official ``TruncatedNormal``."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, low: float = 0.0, high: float = 1.0) -> None:
        self.mu, self.sigma, self.low, self.high = mu, sigma, low, high
        self._normal = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))

    def _bounds(self):
        return (self.low - self.mu) / self.sigma, (self.high - self.mu) / self.sigma

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        alpha, beta = self._bounds()
        uniform = torch.rand(count, self.mu.numel(), generator=generator, dtype=self.mu.dtype)
        low_cdf = self._normal.cdf(alpha)
        p = (self._normal.cdf(beta) - low_cdf) * uniform + low_cdf
        tiny = torch.finfo(p.dtype).eps
        v = (2 * p - 1).clamp(-1 + tiny, 1 - tiny)
        return (self.mu + math.sqrt(2) * torch.erfinv(v) * self.sigma).clamp(self.low, self.high).detach()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self._bounds()
        mass = (self._normal.cdf(beta) - self._normal.cdf(alpha)).log()
        density = (1.0 / self.sigma).log() + self._normal.log_prob((x - self.mu) / self.sigma)
        inside = (x >= self.low) & (x <= self.high)
        return torch.where(inside, density - mass, torch.full_like(density, -math.inf))


@dataclass
class SearchResult:
    """theta: the control points of the final mu (a preset-style theta);
    history: per round, the sampled control points and their rewards."""

    theta: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    history: list[dict] = field(default_factory=list)


def search_surrogate(
    reward_fn: Callable[[torch.Tensor], float],
    *,
    metric: str = "miou",
    pieces: int | None = None,
    mu=None,
    sigma: float = 0.2,
    rounds: int = 12,
    samples: int = 32,
    updates: int = 60,
    lr: float = 0.2,
    clip_eps: float = 0.2,
    baseline: str = "mu",
    generator: torch.Generator | None = None,
) -> SearchResult:
    """See the module docstring. Defaults are the official search configs'
    (ASL_configs/search/*: 2 pieces, 1 for BF1; mu the identity curve [.25,
    .25, .3333, .3333, .5, .5] per curve; sigma 0.2; 12 rounds of 32 samples,
    60 updates, lr 0.2, clip 0.2, the "mu" baseline)."""
    metric = metric.lower()
    if metric not in CURVES:
        raise ValueError(f"metric must be one of {tuple(CURVES)}, got {metric!r}")
    if baseline not in ("mu", "mean"):
        raise ValueError(f"baseline must be 'mu' or 'mean', got {baseline!r}")
    for name, value in (("rounds", rounds), ("samples", samples), ("updates", updates)):
        if int(value) != value or value < (2 if name == "samples" else 0):
            raise ValueError(f"{name} must be an integer >= {2 if name == 'samples' else 0}, got {value}")
    curves = CURVES[metric]
    pieces = (1 if metric == "bf1" else 2) if pieces is None else int(pieces)
    if pieces < 1:
        raise ValueError(f"pieces must be >= 1, got {pieces}")
    per_curve = 4 * pieces - 2
    if mu is None:  # the identity curve: mu_k = 1 / (2M - k) per control point
        mu = [1.0 / (2 * pieces - k) for k in range(2 * pieces - 1) for _ in range(2)] * curves
    mu = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
    if mu.numel() != curves * per_curve or not bool(((mu > 0) & (mu < 1)).all()):
        raise ValueError(f"mu must hold {curves * per_curve} numbers in (0, 1), got {mu.tolist()}")
    mu_logit = torch.logit(mu).requires_grad_()
    sigma_t = torch.full_like(mu, float(sigma))
    optimizer = torch.optim.Adam([mu_logit], lr=lr)
    history = []
    for _ in range(rounds):
        with torch.no_grad():
            current = mu_logit.sigmoid()
        sampler = TruncatedNormal(current, sigma_t)
        u = sampler.sample(samples - 1 if baseline == "mu" else samples, generator)
        if baseline == "mu":
            u = torch.cat([current.view(1, -1), u])
        points = monotone_control_points(u, curves)
        rewards = torch.tensor([float(reward_fn(p)) for p in points], dtype=torch.float64)
        advantage = (rewards - (rewards[0] if baseline == "mu" else rewards.mean())).view(-1, 1)
        old = sampler.log_prob(u).detach()
        for _ in range(updates):
            ratio = (TruncatedNormal(mu_logit.sigmoid(), sigma_t).log_prob(u) - old).exp()
            clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
            loss = -torch.min(ratio * advantage, clipped * advantage).mean(0).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({"control_points": points, "rewards": rewards})
    final = mu_logit.detach().sigmoid()
    return SearchResult(monotone_control_points(final.view(1, -1), curves)[0], final, sigma_t, history)
