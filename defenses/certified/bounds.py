"""IBP and CROWN lower bounds of the margin ``z_y - z_j`` over a threat ball intersected with [0, 1].

* IBP (Gowal et al. 2018, "On the effectiveness of interval bound propagation"): intervals pushed
  forward layer by layer; one forward pass with ``|W|``.
* CROWN (Zhang et al. 2018, "Efficient neural network robustness certification with general
  activation functions"): the margin specification ``C`` (rows ``e_y - e_j``) is propagated
  backward as a linear function of the input, each unstable ReLU replaced by linear lower/upper
  bounds (upper: the chord ``u/(u-l) (z - l)``; lower: slope 0 or 1, whichever is closer to the
  ReLU), then minimised in closed form over the ball. Pre-activation bounds of every ReLU layer
  are themselves computed by CROWN (and intersected with IBP's), batched over samples.

Threat: Linf balls are intersected with [0, 1] exactly (a box); for L2, the bound is the best of
the L2-ball bound and the [0, 1]-box bound (both supersets of the intersection, so it is sound).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .network import Chain

__all__ = ["InputSet", "ibp_bounds", "crown_bounds", "margin_spec"]


class InputSet:
    """``{x : ||x - x0|| <= eps} ∩ [0, 1]`` for a batch ``x0`` (N x C x H x W)."""

    def __init__(self, x0: Tensor, norm: str, eps: float) -> None:
        self.x0, self.norm, self.eps = x0, norm, float(eps)
        if norm == "linf":
            self.lo = (x0 - eps).clamp(0.0, 1.0)
            self.hi = (x0 + eps).clamp(0.0, 1.0)
        else:
            self.lo = torch.maximum(x0 - eps, torch.zeros_like(x0))
            self.hi = torch.minimum(x0 + eps, torch.ones_like(x0))

    def min_linear(self, a: Tensor, c: Tensor) -> Tensor:
        """``min_x a·x + c`` over the set; ``a`` is ``(N, S, *in)``, ``c`` is ``(N, S)``."""
        a = a.flatten(2)
        lo, hi = self.lo.flatten(1).unsqueeze(1), self.hi.flatten(1).unsqueeze(1)
        box = (a.clamp(min=0) * lo + a.clamp(max=0) * hi).sum(-1)
        if self.norm == "linf":
            return box + c
        x0 = self.x0.flatten(1).unsqueeze(1)
        ball = (a * x0).sum(-1) - self.eps * a.norm(dim=-1)
        return torch.maximum(box, ball) + c


def margin_spec(y: Tensor, num_classes: int) -> Tensor:
    """``C`` of shape ``(N, K-1, K)``: row ``j`` is ``e_y - e_j`` over the classes ``j != y``."""
    n = y.shape[0]
    eye = torch.eye(num_classes, device=y.device)
    others = torch.stack([torch.cat([torch.arange(0, int(k)), torch.arange(int(k) + 1, num_classes)])
                          for k in y.cpu()]).to(y.device)
    return eye[y].unsqueeze(1) - eye[others].reshape(n, num_classes - 1, num_classes)


def ibp_bounds(chain: Chain, inputs: InputSet) -> list[tuple[Tensor, Tensor]]:
    """Interval bounds ``(l, u)`` of every segment's output (pre-activations, then logits).

    Differentiable (IBP training backpropagates through it)."""
    lo, hi = inputs.lo, inputs.hi
    out = []
    for i, seg in enumerate(chain.segments):
        if i > 0:
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        center, radius = (lo + hi) / 2, (hi - lo) / 2
        mid = seg.forward(center)
        rad = seg.abs_linear(radius)
        lo, hi = mid - rad, mid + rad
        out.append((lo, hi))
    return out


def _relu_relaxation(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slopes of the lower bound, of the upper bound and the upper bound's intercept."""
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    denom = torch.where(unstable, hi - lo, torch.ones_like(hi))
    up_slope = torch.where(unstable, hi / denom, active.to(hi.dtype))
    up_bias = torch.where(unstable, -hi * lo / denom, torch.zeros_like(hi))
    low_slope = torch.where(unstable, (hi > -lo).to(hi.dtype), active.to(hi.dtype))
    return low_slope, up_slope, up_bias


@torch.no_grad()
def _backward(chain: Chain, upto: int, spec: Tensor, pre: list[tuple[Tensor, Tensor]],
              inputs: InputSet) -> Tensor:
    """Lower bound of ``spec · (output of segment upto)``; ``spec`` is ``(N, S, *out_shape)``."""
    n, s = spec.shape[:2]
    a = spec
    const = torch.zeros(n, s, device=spec.device, dtype=spec.dtype)
    for k in range(upto, -1, -1):
        seg = chain.segments[k]
        b = seg.bias(spec.device, spec.dtype)
        const = const + (a.flatten(2) * b.flatten().view(1, 1, -1)).sum(-1)
        a = seg.vjp(a.reshape((n * s,) + seg.out_shape)).reshape((n, s) + seg.in_shape)
        if k > 0:
            lo, hi = pre[k - 1]
            low_slope, up_slope, up_bias = _relu_relaxation(lo.unsqueeze(1), hi.unsqueeze(1))
            a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
            const = const + (a_neg * up_bias).flatten(2).sum(-1)
            a = a_pos * low_slope + a_neg * up_slope
    return inputs.min_linear(a, const)


def crown_bounds(chain: Chain, inputs: InputSet, spec: Tensor, *,
                 chunk_elems: int = 2**25) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """CROWN lower bound of ``spec · logits`` (``spec``: ``(N, S, K)``) and the pre-activation
    bounds used, each the intersection of CROWN's and IBP's."""
    ibp = ibp_bounds(chain, inputs)
    pre: list[tuple[Tensor, Tensor]] = []
    n = inputs.x0.shape[0]
    for k in range(len(chain.segments) - 1):
        if k == 0 and inputs.norm == "linf":
            # The first segment is affine in the input: over a box its interval (IBP) is the
            # exact range, which CROWN would only recompute at the cost of a spec as wide as
            # the layer. (For an L2 ball CROWN's ball bound can be tighter: kept there.)
            pre.append(ibp[0])
            continue
        shape = chain.segments[k].out_shape
        m = 1
        for d in shape:
            m *= d
        eye = torch.eye(m, device=inputs.x0.device).reshape((m,) + shape)
        eye2 = torch.cat([eye, -eye])  # lower bounds of z and of -z
        in_elems = inputs.x0[0].numel()
        step = max(1, chunk_elems // max(1, 2 * m * in_elems))
        lows, ups = [], []
        for start in range(0, n, step):
            sub = InputSet.__new__(InputSet)
            sl = slice(start, start + step)
            sub.x0, sub.norm, sub.eps = inputs.x0[sl], inputs.norm, inputs.eps
            sub.lo, sub.hi = inputs.lo[sl], inputs.hi[sl]
            spec_k = eye2.unsqueeze(0).expand((sub.x0.shape[0],) + eye2.shape)
            bound = _backward(chain, k, spec_k, [(lo[sl], hi[sl]) for lo, hi in pre], sub)
            lows.append(bound[:, :m].reshape((-1,) + shape))
            ups.append((-bound[:, m:]).reshape((-1,) + shape))
        lo_c, hi_c = torch.cat(lows), torch.cat(ups)
        pre.append((torch.maximum(lo_c, ibp[k][0]), torch.minimum(hi_c, ibp[k][1])))
    return _backward(chain, len(chain.segments) - 1, spec, pre, inputs), pre
