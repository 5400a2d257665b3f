"""Detecting poisoned training samples in a trained model's representation.

* :func:`spectral_signatures` (Tran, Li & Madry 2018, "Spectral Signatures in Backdoor
  Attacks"): within each label, poisoned samples leave a trace along the top singular vector
  of the centred representations; a sample's score is its squared projection on it.
* :func:`activation_clustering` (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural
  Networks by Activation Clustering"): within each label, reduce the representations to a few
  dimensions and split them with 2-means; a label whose small cluster is small and well
  separated holds poison, and that cluster is flagged.

Both run on the training set as it was labelled (poisoned labels included) and need no clean
data. The representation is by default the input of the model's last ``nn.Linear`` (the
penultimate layer), captured with a forward hook, so any user model works; ``layer`` (a module
name from ``model.named_modules()`` or the module itself) selects the output of another layer.

Both return a :class:`DetectionResult`: per-sample ``suspicious`` (bool ``N``) and ``scores``
(float ``N``, higher is more suspicious, comparable across labels), and, given the true poisoned
indices, precision, recall and AUROC.

Usage::

    res = spectral_signatures(model, poisoned.x, poisoned.y, poisoned=poisoned.indices)
    res.recall, res.precision, res.auroc
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..bench.core import check_inputs, make_generator, model_mode

__all__ = ["DetectionResult", "spectral_signatures", "activation_clustering", "features",
           "resolve_layer", "detection_metrics"]

log = logging.getLogger(__name__)


@dataclass
class DetectionResult:
    """Which training samples a detector flags.

    Attributes:
        method: the detector's name.
        suspicious: bool ``N``, the flagged samples.
        scores: float ``N``, higher is more suspicious; comparable across labels (AUROC uses it).
        precision, recall, auroc: against the true poisoned samples when they were given,
            else None. Precision is 0 when nothing is flagged; AUROC None when all or none
            of the samples are poisoned.
        per_class: the detector's per-label statistics (label -> name -> value).
        config: the detector's settings and the layer used.
    """

    method: str
    suspicious: Tensor
    scores: Tensor
    precision: float | None = None
    recall: float | None = None
    auroc: float | None = None
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> Tensor:
        """Indices of the flagged samples."""
        return self.suspicious.nonzero().flatten()


# --- representation ----------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _last_executed(model: nn.Module, kind: type[nn.Module], probe: Tensor) -> tuple[str, nn.Module]:
    """The last module of type ``kind`` that runs in a forward pass on ``probe``."""
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
               for m in model.modules() if isinstance(m, kind)]
    try:
        with torch.no_grad(), model_mode(model):
            model(probe.to(_device(model)))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(f"the model has no {kind.__name__} that runs in its forward pass; "
                         "pass layer= (a module name or module) to choose the representation")
    return names[order[-1]], order[-1]


def resolve_layer(model: nn.Module, layer: str | nn.Module | None, probe: Tensor, *,
                  kind: type[nn.Module] = nn.Linear) -> tuple[str, nn.Module, bool]:
    """``(name, module, capture_input)``: ``layer=None`` is the input of the last ``kind`` run
    in the forward pass; a name or module is that module's output."""
    if layer is None:
        name, module = _last_executed(model, kind, probe[:1])
        return name, module, True
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            known = ", ".join(n for n in modules if n)
            raise ValueError(f"unknown layer {layer!r}; the model's modules are: {known}")
        return layer, modules[layer], False
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module, False
        raise ValueError("layer is not a sub-module of the model")
    raise ValueError(f"layer must be None, a module name or a module, got {type(layer).__name__}")


@torch.no_grad()
def features(model: nn.Module, x: Tensor, *, layer: str | nn.Module | None = None,
             batch_size: int = 512) -> Tensor:
    """The representation of ``x`` (``N x C x H x W``) at ``layer`` as an ``N x D`` CPU tensor.

    ``layer=None``: the input of the last ``nn.Linear`` run in the forward pass (penultimate
    layer). Otherwise the (flattened) output of the named module. Eval mode, restored after.
    """
    _, module, capture_input = resolve_layer(model, layer, x)
    captured: list[Tensor] = []

    def hook(mod, inputs, output):
        t = inputs[0] if capture_input else output
        if not isinstance(t, Tensor):
            raise ValueError(f"layer {mod.__class__.__name__} does not produce a tensor")
        captured.append(t.detach().flatten(1).float().cpu())

    run_with_hook(model, module, hook, x, batch_size)
    return torch.cat(captured)


def run_with_hook(model: nn.Module, module: nn.Module, hook, x: Tensor, batch_size: int) -> None:
    """Run ``model`` over ``x`` in eval mode, batched, with a forward hook on ``module``
    (removed afterwards, also on error)."""
    device = _device(model)
    handle = module.register_forward_hook(hook)
    try:
        with model_mode(model), torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size].to(device))
    finally:
        handle.remove()


# --- metrics -----------------------------------------------------------------------------------


def _auroc(scores: Tensor, positive: Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = scores.double()
    order = s.argsort()
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True,
                                                     return_counts=True)
    if len(uniq) < len(s):
        ends = counts.cumsum(0).double()
        avg = ends - (counts.double() - 1) / 2
        ranks[order] = avg[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def detection_metrics(suspicious: Tensor, scores: Tensor,
                      poisoned: Tensor) -> tuple[float, float, float | None]:
    """``(precision, recall, auroc)`` of flags and scores against ``poisoned`` (indices or a
    bool mask of length N)."""
    n = len(suspicious)
    poisoned = poisoned.cpu()
    if poisoned.dtype == torch.bool:
        if len(poisoned) != n:
            raise ValueError(f"poisoned mask has length {len(poisoned)}, expected {n}")
        truth = poisoned
    else:
        if len(poisoned) and (int(poisoned.min()) < 0 or int(poisoned.max()) >= n):
            raise ValueError(f"poisoned indices must lie in [0, {n})")
        truth = torch.zeros(n, dtype=torch.bool)
        truth[poisoned.long()] = True
    flagged = suspicious.cpu()
    tp = int((flagged & truth).sum())
    precision = tp / int(flagged.sum()) if int(flagged.sum()) else 0.0
    recall = tp / int(truth.sum()) if int(truth.sum()) else 0.0
    return precision, recall, _auroc(scores.cpu(), truth)


def _finish(method: str, suspicious: Tensor, scores: Tensor, poisoned: Tensor | None,
            per_class: dict[int, dict[str, float]], config: dict[str, Any]) -> DetectionResult:
    res = DetectionResult(method, suspicious, scores, per_class=per_class, config=config)
    if poisoned is not None:
        res.precision, res.recall, res.auroc = detection_metrics(suspicious, scores, poisoned)
        log.info("%s: flagged %d, precision %.3f recall %.3f auroc %s", method,
                 int(suspicious.sum()), res.precision, res.recall, res.auroc)
    return res


def _prepare(model, x, y, layer, batch_size):
    x, y = check_inputs(x, y)
    name, _, capture_input = resolve_layer(model, layer, x)
    reps = features(model, x, layer=layer, batch_size=batch_size)
    where = f"input of {name}" if capture_input else f"output of {name}"
    return reps, y.cpu(), where


# --- spectral signatures -----------------------------------------------------------------------


def _centred_by_label(reps: Tensor, y: Tensor, min_class_size: int):
    """Yield ``(label, indices, centred representations, right singular vectors)``."""
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        if len(idx) < min_class_size:
            continue
        r = reps[idx].double()
        r = r - r.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(r, full_matrices=False)
        yield int(c), idx, r, vh


def spectral_signatures(model: nn.Module, x: Tensor, y: Tensor, *,
                        layer: str | nn.Module | None = None, poisoned: Tensor | None = None,
                        epsilon: float = 0.05, min_class_size: int = 10,
                        batch_size: int = 512) -> DetectionResult:
    """Spectral signatures (Tran et al. 2018).

    For each label ``c`` with representations ``R_c`` (``n_c x D``), a sample's score is its
    squared projection on the top right singular vector of ``R_c - mean(R_c)``; the
    ``ceil(1.5 * epsilon * n_c)`` top-scored samples of every label are flagged, where
    ``epsilon`` bounds the poisoned share of a label (the paper's rule). ``scores`` are divided
    by their label's mean so that they compare across labels.

    The method needs ``epsilon`` to be small: when poison makes up a large share of the target
    label (5% of a 10-class training set all-to-one is a third of the target label) the top
    direction still points at the poison, but the clean samples sit far out on the other side
    and the squared projection stops separating them; :func:`activation_clustering` has no
    such limit.

    Args:
        model: any ``nn.Module`` following the input convention.
        x: ``N x C x H x W`` training images in [0, 1]; y: int64 ``N`` labels as trained on.
        layer: None (input of the last ``nn.Linear``), or a module name/module (its output).
        poisoned: true poisoned indices (or a bool mask) to score the detection against.
        epsilon: upper bound on the poisoned share of any label, in (0, 1] (default 0.05).
        min_class_size: labels with fewer samples are not scored (score 0, never flagged).
        batch_size: forward-pass batch size.

    Returns:
        :class:`DetectionResult`; ``per_class[c]`` holds ``flagged`` (share of the label) and
        ``top_singular_value``.
    """
    if not 0.0 < float(epsilon) <= 1.0:
        raise ValueError(f"epsilon must lie in (0, 1], got {epsilon}")
    reps, y, where = _prepare(model, x, y, layer, batch_size)
    scores = torch.zeros(len(y))
    suspicious = torch.zeros(len(y), dtype=torch.bool)
    per_class: dict[int, dict[str, float]] = {}
    for c, idx, r, vh in _centred_by_label(reps, y, min_class_size):
        proj = (r @ vh[0]) ** 2
        # the tolerance keeps float noise (1.5 * 0.1 * 60 = 9.000000000000002) out of ceil
        k = min(len(idx), math.ceil(1.5 * float(epsilon) * len(idx) - 1e-9))
        suspicious[idx[proj.argsort(descending=True)[:k]]] = True
        scores[idx] = (proj / proj.mean().clamp_min(1e-30)).float()
        per_class[c] = {"flagged": k / len(idx), "top_singular_value": float(proj.sum().sqrt())}
    config = {"layer": where, "epsilon": float(epsilon), "min_class_size": min_class_size}
    return _finish("spectral_signatures", suspicious, scores, poisoned, per_class, config)


# --- activation clustering ---------------------------------------------------------------------


def _two_means(z: Tensor, generator: torch.Generator, n_init: int, iters: int = 100) -> Tensor:
    """Best-of-``n_init`` Lloyd 2-means on ``z`` (``n x d``) with k-means++ seeding; labels 0/1."""
    best, best_inertia = torch.zeros(len(z), dtype=torch.long), math.inf
    for _ in range(n_init):
        first = int(torch.randint(len(z), (1,), generator=generator))
        d = ((z - z[first]) ** 2).sum(1)
        if float(d.sum()) <= 0:
            continue  # every point identical: nothing to split
        second = int(torch.multinomial(d / d.sum(), 1, generator=generator))
        centers = torch.stack([z[first], z[second]])
        labels = torch.cdist(z, centers).argmin(1)
        for _ in range(iters):
            for j in range(2):
                if bool((labels == j).any()):
                    centers[j] = z[labels == j].mean(0)
            new = torch.cdist(z, centers).argmin(1)
            if bool((new == labels).all()):
                break
            labels = new
        inertia = float(((z - centers[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def activation_clustering(model: nn.Module, x: Tensor, y: Tensor, *,
                          layer: str | nn.Module | None = None, poisoned: Tensor | None = None,
                          components: int = 10, size_threshold: float = 0.35,
                          separation_threshold: float = 10.0, n_init: int = 4,
                          min_class_size: int = 10, generator: torch.Generator | int | None = None,
                          batch_size: int = 512) -> DetectionResult:
    """Activation clustering (Chen et al. 2018).

    For each label: centre the representations, project them on their top ``components``
    principal directions (the paper uses ICA; PCA is deterministic and does as well here) and
    split them with 2-means. A label holds poison when its smaller cluster is at most
    ``size_threshold`` of it (the paper's relative-size analysis) and the two clusters are
    well apart: their separation, the Fisher ratio ``(m_1 - m_0)^2 / (v_0 + v_1)`` of the
    projections on the line through both centres, is at least ``separation_threshold``.
    Cutting one Gaussian blob in two gives a separation of about 3.5 (clean MNIST labels:
    4 to 8); BadNets poison gives about 20. The smaller cluster of a poisoned label is flagged.

    A sample's score is its label's separation, positive in the smaller cluster and negative
    in the larger, scaled by how far along the line between the centres it lies, so samples
    deep in well-separated small clusters rank first.

    Args:
        model, x, y, layer, poisoned: as for :func:`spectral_signatures`.
        components: dimensions kept before clustering (default 10, the paper's).
        size_threshold: largest relative size of a poisoned cluster, in (0, 1) (default 0.35).
        separation_threshold: smallest separation of a poisoned label's split (default 10).
        n_init: 2-means restarts (k-means++ seeding from ``generator``).
        min_class_size: labels with fewer samples are not clustered (score 0, never flagged).
        generator: a ``torch.Generator`` or seed for the seeding (default seed 0).
        batch_size: forward-pass batch size.

    Returns:
        :class:`DetectionResult`; ``per_class[c]`` holds ``small_share`` and ``separation``.
    """
    if not 0.0 < float(size_threshold) < 1.0:
        raise ValueError(f"size_threshold must lie in (0, 1), got {size_threshold}")
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be a positive int, got {components!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int, got {n_init!r}")
    reps, y, where = _prepare(model, x, y, layer, batch_size)
    g = make_generator(generator)
    scores = torch.zeros(len(y))
    suspicious = torch.zeros(len(y), dtype=torch.bool)
    per_class: dict[int, dict[str, float]] = {}
    for c, idx, r, vh in _centred_by_label(reps, y, min_class_size):
        z = (r @ vh[:components].T).float()
        labels = _two_means(z, g, n_init)
        sizes = torch.bincount(labels, minlength=2)
        small = int(sizes.argmin())
        in_small = labels == small
        if int(sizes.min()) < 2:
            per_class[c] = {"small_share": float(in_small.float().mean()), "separation": 0.0}
            continue
        centre_small, centre_large = z[in_small].mean(0), z[~in_small].mean(0)
        direction = centre_small - centre_large
        half = direction.norm().clamp_min(1e-12) / 2
        t = (z - (centre_small + centre_large) / 2) @ (direction / (2 * half))
        separation = float((t[in_small].mean() - t[~in_small].mean()) ** 2
                           / (t[in_small].var() + t[~in_small].var()).clamp_min(1e-12))
        share = float(in_small.float().mean())
        per_class[c] = {"small_share": share, "separation": separation}
        scores[idx] = separation * (t / half).clamp(-1, 1)
        if share <= size_threshold and separation >= separation_threshold:
            suspicious[idx[in_small]] = True
    config = {"layer": where, "components": components, "size_threshold": float(size_threshold),
              "separation_threshold": float(separation_threshold), "n_init": n_init,
              "min_class_size": min_class_size}
    return _finish("activation_clustering", suspicious, scores, poisoned, per_class, config)
