"""One backdoor evaluation: attack metrics, poison detection, input detection, mitigation.

:func:`evaluate_backdoor` measures, for a model trained on a poisoned set:

* clean accuracy, attack success rate and (given the clean model's accuracy) the
  clean-accuracy cost of the poisoning;
* poison detection on the training set: :func:`~unmask.defenses.backdoor.spectral_signatures`
  and :func:`~unmask.defenses.backdoor.activation_clustering` (precision, recall, AUROC);
* input detection: :func:`~unmask.defenses.strip.strip` (FRR, FAR);
* mitigation: :func:`~unmask.defenses.fine_pruning.fine_pruning` (clean accuracy and ASR
  after).

The defender's trusted clean data is simulated by a seeded draw of training samples that were
not poisoned (``clean_samples`` for fine-pruning, ``overlay_samples`` for STRIP's overlays and
calibration); every metric is measured on the test split.

Usage::

    report = evaluate_backdoor(model, backdoor, poisoned, x_test, y_test, generator=0)
    report.metrics()  # flat dict of numbers
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.backdoor import Backdoor, PoisonedSet
from ..bench.core import make_generator
from ..bench.core.training import accuracy
from .backdoor import DetectionResult, activation_clustering, spectral_signatures
from .fine_pruning import FinePruningResult, fine_pruning
from .strip import StripResult, strip

__all__ = ["BackdoorReport", "evaluate_backdoor"]

log = logging.getLogger(__name__)


@dataclass
class BackdoorReport:
    """Everything :func:`evaluate_backdoor` measured; :meth:`metrics` flattens the numbers."""

    clean_accuracy: float
    attack_success_rate: float
    poisoned: int
    poison_rate: float
    reference_accuracy: float | None = None
    spectral: DetectionResult | None = None
    clustering: DetectionResult | None = None
    strip: StripResult | None = None
    fine_pruning: FinePruningResult | None = None
    clean_accuracy_after_fine_pruning: float | None = None
    attack_success_rate_after_fine_pruning: float | None = None

    @property
    def clean_accuracy_cost(self) -> float | None:
        """Reference (clean model) accuracy minus this model's; positive is a loss."""
        if self.reference_accuracy is None:
            return None
        return self.reference_accuracy - self.clean_accuracy

    def metrics(self) -> dict[str, Any]:
        """Flat ``{name: number}`` of every measured value (None where not measured)."""
        out: dict[str, Any] = {
            "poisoned": self.poisoned,
            "poison_rate": self.poison_rate,
            "clean_accuracy": self.clean_accuracy,
            "reference_accuracy": self.reference_accuracy,
            "clean_accuracy_cost": self.clean_accuracy_cost,
            "attack_success_rate": self.attack_success_rate,
        }
        for key, det in (("spectral", self.spectral), ("clustering", self.clustering)):
            if det is not None:
                out[f"{key}_flagged"] = int(det.suspicious.sum())
                out[f"{key}_precision"] = det.precision
                out[f"{key}_recall"] = det.recall
                out[f"{key}_auroc"] = det.auroc
        if self.strip is not None:
            out["strip_frr"] = self.strip.frr
            out["strip_far"] = self.strip.far
        if self.fine_pruning is not None:
            out["fine_pruning_prune_ratio"] = self.fine_pruning.prune_ratio
            out["fine_pruning_clean_accuracy"] = self.clean_accuracy_after_fine_pruning
            out["fine_pruning_attack_success_rate"] = self.attack_success_rate_after_fine_pruning
        return out


def evaluate_backdoor(model: nn.Module, backdoor: Backdoor, poisoned: PoisonedSet, x_test: Tensor,
                      y_test: Tensor, *, reference_accuracy: float | None = None,
                      detect: bool = True, strip_inputs: bool = True, mitigate: bool = True,
                      clean_samples: int = 1000, overlay_samples: int = 500,
                      strip_samples: int | None = 500, n_overlays: int = 16,
                      fine_pruning_options: dict[str, Any] | None = None,
                      generator: torch.Generator | int | None = None) -> BackdoorReport:
    """Measure a backdoored model and the defenses against it.

    Args:
        model: the model trained on ``poisoned``.
        backdoor: the attack (trigger, target, mode) that poisoned it.
        poisoned: the poisoned training set (its ``indices`` are the detection ground truth).
        x_test, y_test: clean test split (``N x C x H x W`` in [0, 1], int64 ``N``).
        reference_accuracy: the clean model's test accuracy, for the clean-accuracy cost.
        detect, strip_inputs, mitigate: run the poison detectors, STRIP, fine-pruning.
        clean_samples: non-poisoned training samples the defender fine-prunes with.
        overlay_samples: other non-poisoned training samples for STRIP's overlays.
        strip_samples: test images (clean, and triggered) STRIP is measured on; None for all.
        n_overlays: STRIP overlays per input.
        fine_pruning_options: extra keyword arguments for :func:`fine_pruning`.
        generator: a ``torch.Generator`` or seed for every draw (default seed 0).

    Returns:
        :class:`BackdoorReport`.
    """
    g = make_generator(generator)
    report = BackdoorReport(clean_accuracy=accuracy(model, x_test, y_test),
                            attack_success_rate=backdoor.attack_success_rate(model, x_test, y_test),
                            poisoned=len(poisoned.indices), poison_rate=poisoned.rate,
                            reference_accuracy=reference_accuracy)
    if detect:
        report.spectral = spectral_signatures(model, poisoned.x, poisoned.y,
                                              poisoned=poisoned.indices)
        report.clustering = activation_clustering(model, poisoned.x, poisoned.y,
                                                  poisoned=poisoned.indices, generator=g)
    if not (strip_inputs or mitigate):
        return report

    clean = (~poisoned.mask).nonzero().flatten().cpu()
    clean = clean[torch.randperm(len(clean), generator=g)]
    if strip_inputs:
        overlays = poisoned.x[clean[clean_samples:clean_samples + overlay_samples]]
        if len(overlays) == 0:
            raise ValueError(f"no clean training samples left for STRIP's overlays after the "
                             f"{clean_samples} fine-pruning samples; lower clean_samples")
        x_trig, _ = backdoor.triggered_test_set(x_test, y_test)
        x_clean = x_test
        if strip_samples is not None:
            x_clean = x_clean[torch.randperm(len(x_clean), generator=g)[:strip_samples]]
            x_trig = x_trig[torch.randperm(len(x_trig), generator=g)[:strip_samples]]
        report.strip = strip(model, x_clean, x_trig, overlays, n_overlays=n_overlays, generator=g)
    if mitigate:
        keep = clean[:clean_samples]
        fp = fine_pruning(model, poisoned.x[keep], poisoned.y[keep], generator=g,
                          **dict(fine_pruning_options or {}))
        report.fine_pruning = fp
        report.clean_accuracy_after_fine_pruning = accuracy(fp.model, x_test, y_test)
        report.attack_success_rate_after_fine_pruning = backdoor.attack_success_rate(
            fp.model, x_test, y_test)
    return report
