"""Certified lower bounds of robust accuracy: IBP, CROWN and exact MILP verification.

An attack's robust accuracy is an upper bound (a stronger attack can only lower it); the
certified robust accuracy from :func:`certify` is a proven lower bound on the same samples.
When the two coincide the robust accuracy is exact.

Usage::

    res = certify(model, x, y, Threat("linf", 0.1), method="crown")
    res.certified_accuracy, res.status  # per sample: "certified" | "broken" | "unknown"
    assert_sound(res, attack_broken)    # raises SoundnessError naming a certified-but-broken sample

Supported layers: Linear, Conv2d, ReLU, Flatten, eval-mode BatchNorm, AvgPool2d, ``Normalize``
(and containers of them); anything else raises :class:`NotSupportedError` ("not supported: X").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...bench.core import StrEnum, Threat, check_inputs, check_schema, model_mode, parse_enum
from .bounds import InputSet, crown_bounds, ibp_bounds, margin_spec
from .milp import TOL as MILP_TOL
from .milp import MilpOutcome, milp_margin
from .network import Chain, NotSupportedError, to_chain

__all__ = ["BoundMethod", "Status", "CertifyResult", "SoundnessError", "NotSupportedError",
           "certify", "margin_lower_bound", "assert_sound", "to_chain", "Chain", "milp_margin",
           "MilpOutcome"]


class BoundMethod(StrEnum):
    """A bound method: ``ibp`` < ``crown`` < ``milp`` in tightness and cost."""

    IBP = "ibp"
    CROWN = "crown"
    MILP = "milp"


class Status(StrEnum):
    """Per-sample verdict of :func:`certify`."""

    CERTIFIED = "certified"
    BROKEN = "broken"
    UNKNOWN = "unknown"


class SoundnessError(RuntimeError):
    """A sample was certified robust and an attack broke it: a bug in the bounds or the attack."""


@dataclass(frozen=True)
class CertifyResult:
    """Per-sample outcome of :func:`certify`.

    ``lower``: proven lower bound of ``min_j z_y - z_j`` over the ball (N,); ``status``: one
    :class:`Status` value per sample; ``seconds``: wall time; ``x_adv``: per sample a verified
    counterexample (MILP) or None.
    """

    method: str
    threat: Threat
    lower: list[float]
    status: list[str]
    seconds: float
    x_adv: list[list[float] | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        """The number of samples."""
        return len(self.status)

    @property
    def certified(self) -> list[bool]:
        """Per sample: proven robust (status ``certified``)."""
        return [s == Status.CERTIFIED.value for s in self.status]

    @property
    def certified_accuracy(self) -> float:
        """Fraction of samples proven robust: a lower bound of the robust accuracy."""
        return sum(self.certified) / max(1, self.n)

    @property
    def seconds_per_sample(self) -> float:
        """Wall-clock seconds per sample."""
        return self.seconds / max(1, self.n)

    SCHEMA_VERSION = 1  # of to_dict; from_dict reads every version up to it

    def to_dict(self) -> dict:
        """JSON-ready; ``certified_accuracy`` is derived (from_dict ignores it)."""
        return {"schema_version": self.SCHEMA_VERSION, "method": self.method,
                "threat": self.threat.to_dict(),
                # -inf (misclassified at x) as null: the dict stays valid JSON
                "lower": [v if math.isfinite(v) else None for v in self.lower],
                "status": list(self.status), "seconds": self.seconds,
                "certified_accuracy": self.certified_accuracy,
                "x_adv": [None if a is None else list(a) for a in self.x_adv]}

    @classmethod
    def from_dict(cls, d: dict) -> CertifyResult:
        """The result ``to_dict`` wrote (a null lower bound reads back as -inf)."""
        check_schema(d, cls.SCHEMA_VERSION, "certify result")
        t = d["threat"]
        return cls(method=d["method"], threat=Threat(t["norm"], t["eps"]),
                   lower=[-math.inf if v is None else float(v) for v in d["lower"]],
                   status=list(d["status"]), seconds=float(d["seconds"]),
                   x_adv=[None if a is None else list(a) for a in d.get("x_adv", [])])


def margin_lower_bound(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
                       method: str = "crown") -> Tensor:
    """Proven lower bound of ``z_y - z_j`` for every ``j != y`` (N x (K-1)) by IBP or CROWN.

    ``crown`` returns the elementwise maximum of CROWN's and IBP's bounds (both sound), so it
    is never looser than ``ibp``."""
    m = parse_enum(BoundMethod, method, "method")
    if m is BoundMethod.MILP:
        raise ValueError("margin_lower_bound takes method 'ibp' or 'crown'; use certify for 'milp'")
    with model_mode(model, train=False):
        chain = to_chain(model, tuple(x.shape[1:]))
        inputs = InputSet(x, threat.norm.value, threat.eps)
        k = chain.forward(x[:1]).shape[1]
        spec = margin_spec(y, k).to(x.dtype)
        lo, hi = ibp_bounds(chain, inputs)[-1]
        # C z >= C+ l + C- u
        ibp = (spec.clamp(min=0) * lo.unsqueeze(1) + spec.clamp(max=0) * hi.unsqueeze(1)).sum(-1)
        if m is BoundMethod.IBP:
            return ibp
        # Both bounds are proven, so their maximum is: on IBP-trained networks CROWN's linear
        # relaxation of the last layers can be looser than IBP's intervals (Zhang et al. 2020).
        return torch.maximum(crown_bounds(chain, inputs, spec)[0], ibp)


def certify(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, method: str = "crown",
            time_limit: float = 10.0) -> CertifyResult:
    """Certify each sample of ``x`` (N x C x H x W in [0, 1]) with labels ``y`` against ``threat``.

    ``method``: ``"ibp"``, ``"crown"`` or ``"milp"`` (exact, Linf only, ``time_limit`` seconds per
    sample; a timeout leaves the sample "unknown"). A sample misclassified at ``x`` itself, or
    with a MILP counterexample misclassified by the model in fp32, is "broken".
    Raises :class:`NotSupportedError` for unsupported layers.
    """
    m = parse_enum(BoundMethod, method, "method")
    if not isinstance(threat, Threat):
        raise TypeError(f"threat must be a Threat, got {type(threat).__name__}")
    if time_limit <= 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    x, y = check_inputs(x, y)
    if m is BoundMethod.MILP and threat.norm.value != "linf":
        raise ValueError("method 'milp' supports the linf threat only (an L2 ball is not linear)")
    start = time.perf_counter()
    with model_mode(model, train=False), torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
        if m is BoundMethod.MILP:
            chain = to_chain(model, tuple(x.shape[1:]))
            inputs = InputSet(x, "linf", threat.eps)
            k = chain.forward(x[:1]).shape[1]
            spec = margin_spec(y, k).to(x.dtype)
            crown_low, pre = crown_bounds(chain, inputs, spec)
            out_lo, out_hi = ibp_bounds(chain, inputs)[-1]
            crown_low = torch.maximum(crown_low, (spec.clamp(min=0) * out_lo.unsqueeze(1)
                                                  + spec.clamp(max=0) * out_hi.unsqueeze(1)).sum(-1))
            lower, status, advs = [], [], []
            for i in range(x.shape[0]):
                if bool(clean_wrong[i]):
                    lower.append(float("-inf"))
                    status.append(Status.BROKEN.value)
                    advs.append(None)
                    continue
                if float(crown_low[i].min()) > 0:  # CROWN already proves it
                    lower.append(float(crown_low[i].min()))
                    status.append(Status.CERTIFIED.value)
                    advs.append(None)
                    continue
                per_class = torch.full((k,), float("inf"), dtype=torch.float64)
                per_class[[j for j in range(k) if j != int(y[i])]] = crown_low[i].double().cpu()
                out = milp_margin(chain, inputs.lo[i], inputs.hi[i], int(y[i]),
                                  [(lo[i], hi[i]) for lo, hi in pre], time_limit=time_limit,
                                  class_lower=per_class)
                low = max(out.lower, float(crown_low[i].min()))
                adv = None
                if out.x_adv is not None:
                    xa = torch.as_tensor(out.x_adv, dtype=torch.float32, device=x.device)
                    xa = torch.minimum(torch.maximum(xa.view_as(x[i]), inputs.lo[i]), inputs.hi[i])
                    if int(model(xa.unsqueeze(0)).argmax(1)) != int(y[i]):
                        adv = xa.flatten().tolist()
                lower.append(low)
                advs.append(adv)
                if adv is not None:
                    status.append(Status.BROKEN.value)
                elif low > MILP_TOL:
                    status.append(Status.CERTIFIED.value)
                else:
                    status.append(Status.UNKNOWN.value)
        else:
            low = margin_lower_bound(model, x, y, threat, method=m.value).min(1).values
            lower = low.tolist()
            status = [Status.BROKEN.value if bool(w) else
                      (Status.CERTIFIED.value if lv > 0 else Status.UNKNOWN.value)
                      for w, lv in zip(clean_wrong.tolist(), lower)]
            advs = [None] * len(status)
    return CertifyResult(m.value, threat, lower, status, time.perf_counter() - start, advs)


def assert_sound(result: CertifyResult, broken: list[bool] | Tensor,
                 sample_ids: list[int] | None = None) -> None:
    """Raise :class:`SoundnessError` naming the first sample certified robust yet ``broken``.

    ``broken``: per sample, whether any attack (or the clean check) found a misclassified point.
    """
    flags = [bool(b) for b in (broken.tolist() if isinstance(broken, Tensor) else broken)]
    if len(flags) != result.n:
        raise ValueError(f"broken has {len(flags)} entries for {result.n} certified samples")
    for i, (c, b) in enumerate(zip(result.certified, flags)):
        if c and b:
            sid = sample_ids[i] if sample_ids is not None else i
            raise SoundnessError(
                f"soundness bug: sample {sid} is certified robust by {result.method} "
                f"(margin lower bound {result.lower[i]:.4g}) but an attack broke it")
