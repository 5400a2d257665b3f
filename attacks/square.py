"""Square Attack (Andriushchenko et al., ECCV 2020); documented on :class:`Square`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bench.core import Norm, Threat, margin, uniform
from .base import Attack, compaction_points, register_attack
from .pgd import _positive_int

__all__ = ["Square", "p_schedule"]

# (upper end of the iteration range on the paper's 10,000-iteration scale, divisor of p_init)
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256))


def p_schedule(p_init: float, iteration: int, queries: int) -> float:
    """The share of pixels changed at ``iteration`` of ``queries`` (paper, Sec. 3)."""
    it = int(iteration / queries * 10000)
    for upper, divisor in _SCHEDULE:
        if it <= upper:
            return p_init / divisor
    return p_init / 512


def _choice(shape, generator, device) -> Tensor:
    """Random signs in {-1, +1}."""
    return torch.where(uniform(shape, generator, device) < 0.5, -1.0, 1.0)


def _pseudo_gaussian(s: int) -> Tensor:
    """The paper's meta-square: two rectangles of concentric 1/r^2 rings, opposite signs."""

    def rings(h: int, w: int) -> Tensor:
        delta = torch.zeros(h, w)
        cy, cx = h // 2, w // 2
        for r in range(max(cy, cx) + 1):
            delta[max(cy - r, 0):min(cy + r + 1, h), max(cx - r, 0):min(cx + r + 1, w)] += \
                1.0 / (r + 1) ** 2
        return delta / delta.norm()

    delta = torch.zeros(s, s)
    delta[: s // 2] = rings(s // 2, s)
    delta[s // 2:] = -rings(s - s // 2, s)
    return delta / delta.norm()


@register_attack("square")
class Square(Attack):
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020).

    Threat model: black-box, score-based (logits only, no gradient), ``Linf`` or ``L2`` ball of
    radius ``eps`` intersected with [0, 1]; untargeted, or targeted when ``targets`` is given.

    Each query changes one random square window of the current best perturbation and keeps the
    change if the margin loss ``z_y - max_{j != y} z_j`` decreases. The window's side follows the
    paper's schedule of the share of changed pixels ``p`` (``p_init`` halved at 10, 50, 200, 500,
    1000, 2000, 4000, 6000 and 8000 of 10,000 iterations, rescaled to ``queries``; see
    :func:`p_schedule`).

    * Linf: initialised with vertical stripes of +-eps; each window is set to +-eps per channel
      (windows and signs drawn per sample; a window that would not change the image takes the
      opposite sign, so no query is wasted).
    * L2: the paper's pseudo-Gaussian "meta-square" perturbations, moving mass from a second
      window to the first while keeping the perturbation on the eps-sphere.

    Only forward passes are needed, so it works on models whose gradients are useless: the
    reference black-box check of the masking diagnosis.

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        queries: model queries per sample, the initialisation included (default 5000).
        p_init: initial share of changed pixels, in (0, 1] (default 0.8).

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N, ``targets`` int64 N or None ->
    :class:`~unmask.bench.core.AttackResult` with per-sample query counts in ``forwards`` (and
    zero ``backwards``).

    Usage: ``Square(Threat("linf", 0.3), queries=5000)(model, x, y, generator=g)``
    """

    name = "square"
    gradient_free = True

    def __init__(self, threat: Threat, queries: int = 5000, p_init: float = 0.8) -> None:
        super().__init__(threat)
        self.queries = _positive_int(queries, "queries")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.p_init = float(p_init)

    def config(self):
        return {**super().config(), "queries": self.queries, "p_init": self.p_init}

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        # Window positions for L2 are drawn on the host: use a CPU generator so no device
        # synchronisation happens (derived once from the caller's generator if it is not).
        host_gen = generator
        if generator.device.type != "cpu":
            host_gen = torch.Generator().manual_seed(
                int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
        n, c, h, w = x[idx].shape
        eps = self.threat.eps
        points = compaction_points(self.queries)
        xa, ya = x[idx], y[idx]
        ta = targets[idx] if targets is not None else None
        view = (-1, 1, 1, 1)

        def query(x_new: Tensor) -> Tensor:
            with torch.no_grad():
                logits = oracle.logits(model, x_new, generator)
            tracker.cost(idx, oracle.samples)
            return margin(logits, ya, ta)

        if self.threat.norm is Norm.LINF:
            init = xa + eps * _choice((n, c, 1, w), generator, x.device)
        else:
            init = xa + self._l2_init(n, c, h, w, host_gen, x.device)
        init = self.threat.project(init, xa)
        tracker.update(idx, init, query(init))

        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        for it in range(1, self.queries):
            p = p_schedule(self.p_init, it, self.queries)
            x_best = tracker.x_best[idx]
            if self.threat.norm is Norm.LINF:
                s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1)
                vh = (uniform((n,), generator, x.device) * (h - s + 1)).long().view(-1, 1, 1)
                vw = (uniform((n,), generator, x.device) * (w - s + 1)).long().view(-1, 1, 1)
                window = ((rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s))
                window = window.unsqueeze(1)
                signs = _choice((n, c, 1, 1), generator, x.device)
                cand = torch.where(window, xa + eps * signs, x_best).clamp(0, 1)
                moved = ((cand - x_best).abs() > 1e-7) & window
                unchanged = ~moved.flatten(1).any(1)
                flipped = torch.where(window, xa - eps * signs, x_best).clamp(0, 1)
                cand = torch.where(unchanged.view(view), flipped, cand)
            else:
                cand = self._l2_step(xa, x_best, p, host_gen)
            tracker.update(idx, cand, query(cand))
            if it + 1 in points and it + 1 < self.queries:
                idx, (xa, ya, ta) = tracker.shrink(idx, xa, ya, ta)
                n = idx.numel()
                if not n:
                    return

    def _l2_init(self, n, c, h, w, host_gen, device) -> Tensor:
        """The paper's L2 initialisation: a grid of meta-squares with random signs."""
        s = max(h // 5, 1)
        delta = torch.zeros(n, c, h, w, device=device)
        start = (h - s * 5) // 2 if h >= 5 else 0
        pert = _pseudo_gaussian(s).to(device)
        for i in range(h // s):
            for j in range(w // s):
                vh, vw = start + i * s, start + j * s
                if vh + s > h or vw + s > w:
                    continue
                signs = _choice((n, c, 1, 1), host_gen, device)
                delta[:, :, vh:vh + s, vw:vw + s] += pert.view(1, 1, s, s) * signs
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return delta / norms * self.threat.eps

    def _l2_step(self, xa: Tensor, x_best: Tensor, p: float, host_gen) -> Tensor:
        n, c, h, w = xa.shape
        eps = self.threat.eps
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + 1 if s % 2 == 0 else s, h - (1 if h % 2 == 0 else 0))
        s = max(min(s, h, w), 1)
        vh, vw, vh2, vw2 = (int(v) for v in torch.randint(0, h - s + 1, (4,), generator=host_gen))
        delta = x_best - xa
        win1 = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        win2 = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
        norm_window1 = delta[win1].pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
        mask = torch.zeros_like(delta)
        mask[win1] = 1
        mask[win2] = 1
        norm_image = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        norm_windows = (delta * mask).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        pert = _pseudo_gaussian(s).to(xa.device)
        if bool(torch.rand((), generator=host_gen) > 0.5):
            pert = pert.t()
        new = pert.view(1, 1, s, s) * _choice((n, c, 1, 1), host_gen, xa.device)
        new = new + delta[win1] / (norm_window1 + 1e-12)
        budget = ((eps**2 - norm_image**2).clamp_min(0) / c + norm_windows**2).sqrt()
        new = new / (new.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt() + 1e-12) * budget
        delta = delta.clone()
        delta[win2] = 0
        delta[win1] = new
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.threat.project(xa + delta / norms * eps, xa)
