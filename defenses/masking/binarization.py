"""The binarization test (Zimmermann et al., NeurIPS 2022): per sample, a binary task on the
model's own penultimate features with a known adversarial example inside the ball. An attack
that cannot solve tasks that are solvable by construction is being defeated by the model's
gradients, whatever its robust accuracy says."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attacks import PGD
from ...bench.core import Norm, Threat, model_mode, normal, uniform
from .registry import Context, Outcome, check
from .report import MaskingKind, Verdict

# The share of guaranteed-breakable tasks the attack may fail before it is declared defeated;
# the paper treats any failure as a warning and high failure rates as a sign of masking.
BINARIZATION_SUSPICIOUS, BINARIZATION_MASKED = 0.10, 0.5


def _features(model: nn.Module, x: Tensor) -> tuple[Tensor, nn.Module | None]:
    """The input of the model's last nn.Linear (the penultimate representation)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        return model(x), None
    store = {}
    handle = last.register_forward_hook(lambda m, i, o: store.__setitem__("f", i[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return store["f"].flatten(1), last


class _FeatureHead(nn.Module):
    """Binary classifier w . phi(x) + b on the model's features; logits (0, w.phi + b)."""

    def __init__(self, model: nn.Module, last: nn.Linear | None, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.model, self.last = model, last
        self.register_buffer("w", w)
        self.register_buffer("b", b)

    def forward(self, x: Tensor) -> Tensor:
        if self.last is None:
            feats = self.model(x).flatten(1)
        else:
            store = {}
            handle = self.last.register_forward_hook(lambda m, i, o: store.__setitem__("f", i[0]))
            try:
                self.model(x)
            finally:
                handle.remove()
            feats = store["f"].flatten(1)
        score = feats @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


@check("binarization test", family="binarization", kind=MaskingKind.SHATTERED,
       severity=Verdict.SUSPICIOUS, source="Zimmermann et al., NeurIPS 2022 (binarization test)",
       rule=(f"share of guaranteed-breakable tasks PGD fails > {BINARIZATION_SUSPICIOUS} "
             f"(suspicious), > {BINARIZATION_MASKED} (masked)"),
       thresholds=("BINARIZATION_SUSPICIOUS", "BINARIZATION_MASKED"),
       evidence=("tasks", "attack_failures"),
       cost="per task: 18 forward passes and PGD-`steps` on one sample, on up to "
            "`binarization_samples` samples")
def binarization_test(ctx: Context) -> Outcome:
    """Zimmermann et al. 2022: per sample, a binary task on the model's own features with a
    known adversarial example inside the ball; the attack must find one."""
    model, x, threat, g, steps = ctx.view, ctx.xc, ctx.threat, ctx.g, ctx.steps
    n = min(ctx.n_att, ctx.budget.binarization_samples)
    failures, built = 0, 0
    inner = 16
    with model_mode(model):
        for i in range(n):
            xi = x[i:i + 1]
            with torch.no_grad():
                # Inner points: a small ball (a tenth of eps) around x, labelled 0; one
                # boundary point of the full ball (a random corner / sphere point), labelled 1.
                small = Threat(threat.norm, threat.eps * 0.1)
                pts = small.random_point(xi.repeat(inner, 1, 1, 1), g)
                pts = torch.cat([xi, pts])
                if threat.norm is Norm.LINF:
                    corner = torch.where(uniform(xi.shape, g, x.device) < 0.5, -1.0, 1.0)
                    boundary = threat.project(xi + threat.eps * corner, xi)
                else:
                    direction = normal(xi.shape, g, x.device)
                    boundary = threat.project(xi + threat.eps * direction / direction.norm(), xi)
                feats, last = _features(model, torch.cat([pts, boundary]))
            feats = feats.detach().float()
            labels = torch.zeros(feats.shape[0], device=feats.device)
            labels[-1] = 1.0
            mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
            w = torch.zeros(feats.shape[1], device=feats.device, requires_grad=True)
            b = torch.zeros((), device=feats.device, requires_grad=True)
            opt = torch.optim.Adam([w, b], lr=0.1)
            weights = torch.ones_like(labels)
            weights[-1] = float(inner)  # balance the single boundary point
            with torch.enable_grad():
                for _ in range(200):
                    opt.zero_grad()
                    z = ((feats - mu) / sd) @ w + b
                    F.binary_cross_entropy_with_logits(z, labels, weight=weights).backward()
                    opt.step()
            with torch.no_grad():
                w_eff, b_eff = w / sd, b - (mu / sd) @ w
                z = feats @ w_eff + b_eff
            if not (bool((z[:-1] < 0).all()) and bool(z[-1] > 0)):
                continue  # the features cannot separate the boundary point: no task
            built += 1
            head = _FeatureHead(model, last, w_eff.detach(), b_eff.detach()).eval()
            # From the clean input, no random start: a random point of the ball often lands
            # in the boundary point's class by itself, and the test is of the gradient.
            zero = torch.zeros(1, dtype=torch.long, device=x.device)
            r = ctx.adapt(PGD(threat, steps=steps, random_start=False))(head, xi, zero,
                                                                        generator=g)
            failures += int(not bool(r.success.all()))
    if not built:
        return Outcome(None, True, skipped="no sample gave a separable binary task")
    share = failures / built
    severity = Verdict.MASKED if share > BINARIZATION_MASKED else Verdict.SUSPICIOUS
    return Outcome(share, share <= BINARIZATION_SUSPICIOUS,
                   {"tasks": built, "attack_failures": failures}, severity=severity)
