"""STRIP: detecting triggered inputs at inference time (Gao et al. 2019, "STRIP: A Defence
Against Trojan Attacks on Deep Neural Networks").

Superimpose an input with random clean images and look at the entropy of the predictions: a
clean input's prediction scatters (high entropy), a triggered input keeps predicting the
target because the trigger survives the overlay (low entropy). Inputs whose mean entropy falls
below a threshold are rejected. As in the paper, the threshold is the ``frr`` quantile of the
entropies of held-out clean inputs, so the false-rejection rate is chosen, and the
false-acceptance rate (triggered inputs let through) is what the defence achieves.

Superimposition follows the paper: ``clamp(x + overlay, 0, 1)`` (``alpha`` scales the
overlay).

Shapes: images ``N x C x H x W`` in [0, 1]; entropies float ``N``.

Usage::

    res = strip(model, x_clean_test, x_triggered, x_clean_heldout, generator=0)
    res.frr, res.far
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench.core import check_images, make_generator, model_mode

__all__ = ["StripResult", "strip", "strip_entropy"]

log = logging.getLogger(__name__)


@dataclass
class StripResult:
    """What :func:`strip` measured.

    Attributes:
        threshold: entropy below which an input is rejected as triggered.
        frr: false-rejection rate in [0, 1], clean inputs rejected.
        far: false-acceptance rate in [0, 1], triggered inputs accepted.
        entropy_clean, entropy_triggered: float ``N`` mean overlay entropies.
        config: the settings.
    """

    threshold: float
    frr: float
    far: float
    entropy_clean: Tensor
    entropy_triggered: Tensor
    config: dict[str, Any] = field(default_factory=dict)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def strip_entropy(model: nn.Module, x: Tensor, overlays: Tensor, *, n_overlays: int = 16,
                  alpha: float = 1.0, generator: torch.Generator | int | None = None,
                  batch_size: int = 64) -> Tensor:
    """Mean prediction entropy (nats) of each input superimposed with ``n_overlays`` clean images.

    Args:
        model: a classifier returning logits (``N x K``), evaluated in eval mode.
        x: ``N x C x H x W`` inputs in [0, 1].
        overlays: ``M x C x H x W`` clean images in [0, 1] to draw overlays from.
        n_overlays: overlays per input (the paper uses 100; 16 is enough on MNIST).
        alpha: weight of the overlay in ``clamp(x + alpha * overlay, 0, 1)`` (default 1).
        generator: a ``torch.Generator`` or seed picking the overlays (default seed 0).
        batch_size: inputs per forward pass (each one expands to ``n_overlays`` images).

    Returns:
        float ``N`` on the CPU.
    """
    x = check_images(x)
    overlays = check_images(overlays, "overlays")
    if overlays.shape[1:] != x.shape[1:]:
        raise ValueError(f"overlays must have the inputs' shape {tuple(x.shape[1:])}, got "
                         f"{tuple(overlays.shape[1:])}")
    if isinstance(n_overlays, bool) or not isinstance(n_overlays, int) or n_overlays < 1:
        raise ValueError(f"n_overlays must be a positive int, got {n_overlays!r}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    g = make_generator(generator)
    pick = torch.randint(len(overlays), (len(x), n_overlays), generator=g)
    device = _device(model)
    out = []
    with model_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            ob = overlays[pick[i:i + batch_size].flatten()].to(device)
            mixed = (xb.repeat_interleave(n_overlays, 0) + alpha * ob).clamp_(0.0, 1.0)
            logp = F.log_softmax(model(mixed).float(), dim=1)
            entropy = -(logp.exp() * logp).sum(1)
            out.append(entropy.view(-1, n_overlays).mean(1).cpu())
    return torch.cat(out)


def strip(model: nn.Module, x_clean: Tensor, x_triggered: Tensor, overlays: Tensor, *,
          frr: float = 0.01, calibration: Tensor | None = None, n_overlays: int = 16,
          alpha: float = 1.0, generator: torch.Generator | int | None = None,
          batch_size: int = 64) -> StripResult:
    """Run STRIP and measure its false-rejection and false-acceptance rates.

    Args:
        model: the (possibly backdoored) classifier.
        x_clean: clean test inputs (``N x C x H x W``); the measured FRR is on them.
        x_triggered: triggered test inputs; the measured FAR is on them.
        overlays: held-out clean images the overlays are drawn from.
        frr: target false-rejection rate setting the threshold, in (0, 1) (default 0.01).
        calibration: held-out clean inputs whose entropies set the threshold; default
            ``overlays``.
        n_overlays, alpha, generator, batch_size: as for :func:`strip_entropy`.

    Returns:
        :class:`StripResult`.
    """
    if not 0.0 < float(frr) < 1.0:
        raise ValueError(f"frr must lie in (0, 1), got {frr}")
    g = make_generator(generator)
    kw = dict(n_overlays=n_overlays, alpha=alpha, generator=g, batch_size=batch_size)
    calib = overlays if calibration is None else calibration
    threshold = float(torch.quantile(strip_entropy(model, calib, overlays, **kw).double(),
                                     float(frr)))
    h_clean = strip_entropy(model, x_clean, overlays, **kw)
    h_trig = strip_entropy(model, x_triggered, overlays, **kw)
    res = StripResult(threshold=threshold,
                      frr=float((h_clean < threshold).float().mean()),
                      far=float((h_trig >= threshold).float().mean()),
                      entropy_clean=h_clean, entropy_triggered=h_trig,
                      config={"target_frr": float(frr), "n_overlays": n_overlays,
                              "alpha": float(alpha), "calibration_samples": len(calib)})
    log.info("STRIP: threshold %.4f, FRR %.4f, FAR %.4f", threshold, res.frr, res.far)
    return res
