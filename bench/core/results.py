"""Result types every attack and evaluation shares: :class:`AttackResult`, the per-sample
:class:`SampleOutcomes`, the :func:`margin` whose sign decides success, and the majority rule
that defines robustness of a randomised model (:func:`robust_by_majority`, :data:`DRAWS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ['AttackResult', 'margin', 'DRAWS', 'robust_by_majority', 'SampleOutcomes', "check_schema"]


@dataclass
class AttackResult:
    """What every attack returns.

    Attributes:
        x_adv: ``N x C x H x W``; the best iterate per sample (adversarial where ``success``).
        success: bool ``N``; the attack's goal was reached (misclassified, or the target hit).
        margin: float ``N``; best margin found: ``z_y - max_{j != y} z_j`` (untargeted) or
            ``max_{j != t} z_j - z_t`` (targeted). Negative means success.
        forwards / backwards: int64 ``N``; model forward passes and input-gradient
            evaluations spent on each sample. Samples broken early stop costing.
        name, config: the attack's name and its settings, for provenance.
        expected_success: float ``N`` or None; for randomised models or transformations (EOT),
            the share of fresh random draws under which ``x_adv`` reaches the goal.
    """

    x_adv: Tensor
    success: Tensor
    margin: Tensor
    forwards: Tensor
    backwards: Tensor
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    expected_success: Tensor | None = None

    @property
    def n_forward(self) -> int:
        """Total forward passes over all samples."""
        return int(self.forwards.sum())

    @property
    def n_backward(self) -> int:
        """Total input-gradient evaluations over all samples."""
        return int(self.backwards.sum())

    @property
    def queries(self) -> Tensor:
        """Per-sample model queries (forward passes), the cost measure of score-based attacks."""
        return self.forwards

    @property
    def success_rate(self) -> float:
        """Share of samples where the attack reached its goal (0.0 for no samples)."""
        return float(self.success.float().mean()) if self.success.numel() else 0.0

    @property
    def robust_accuracy(self) -> float:
        """Share of samples the attack did not break; a sample misclassified before the attack
        counts as broken (its clean margin is already negative)."""
        robust = ~self.success
        return float(robust.float().mean()) if robust.numel() else 0.0


def margin(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """Per-sample classification margin; negative exactly when the attack goal is met.

    Untargeted: ``z_y - max_{j != y} z_j``. Targeted: ``max_{j != t} z_j - z_t``.
    """
    if targets is None:
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return true - other
    tgt = logits.gather(1, targets[:, None]).squeeze(1)
    other = logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
    return other - tgt


# One definition of robustness for a randomised model, used by the ensemble, the suite runner,
# the masking diagnosis, the pytest helper and the leaderboard: a sample is robust when the
# model classifies it correctly on a strict majority of DRAWS fresh forward passes. A tie
# counts as broken (the defense must win, not draw), and so does a NaN rate. 32 draws put the
# standard error of one sample's rate at <= 9 points, so a majority call errs only near 50%.
DRAWS = 32


def robust_by_majority(fooled_rate: Tensor) -> Tensor:
    """Bool ``N``: robust where the share of draws fooled is below one half (NaN: broken)."""
    return fooled_rate < 0.5


@dataclass(frozen=True)
class SampleOutcomes:
    """Who broke each of ``n`` samples: the per-sample record every evaluation of the same
    samples produces (the ensemble, the masking diagnosis with its follow-up), so that the
    reported robust accuracy can be the worst case over every attack that ran.

    Attributes:
        broken_by: per sample ``"clean"`` (misclassified without attack), the label of the
            first attack whose adversarial example, re-checked on the model in fp32 and inside
            the threat ball, is misclassified; or None (robust).
        fooled_rate: randomised models only: per sample the share of :data:`DRAWS` fresh draws
            fooled by its best adversarial example (robust iff :func:`robust_by_majority`).

    Usage: ``worst = ensemble_outcomes.merge(diagnosis_outcomes); worst.robust_accuracy``
    """

    broken_by: tuple[str | None, ...]
    fooled_rate: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "broken_by", tuple(self.broken_by))
        if self.fooled_rate is not None:
            rate = tuple(float(r) for r in self.fooled_rate)
            if len(rate) != len(self.broken_by):
                raise ValueError(f"fooled_rate has {len(rate)} entries for "
                                 f"{len(self.broken_by)} samples")
            object.__setattr__(self, "fooled_rate", rate)

    @property
    def n(self) -> int:
        """The number of samples."""
        return len(self.broken_by)

    @property
    def broken(self) -> Tensor:
        """Bool ``N``: broken (by the clean pass or an attack)."""
        return torch.tensor([b is not None for b in self.broken_by], dtype=torch.bool)

    @property
    def robust_accuracy(self) -> float:
        """Share of samples no one broke (0.0 for no samples)."""
        return sum(b is None for b in self.broken_by) / self.n if self.n else 0.0

    def counts(self) -> dict[str, int]:
        """Samples broken per label (``"clean"`` included), in order of first appearance."""
        out: dict[str, int] = {}
        for b in self.broken_by:
            if b is not None:
                out[b] = out.get(b, 0) + 1
        return out

    def merge(self, other: SampleOutcomes) -> SampleOutcomes:
        """The per-sample worst case of two records of the same samples: broken when either
        broke it (this record's label wins where both did); the higher fooled rate."""
        if other.n != self.n:
            raise ValueError(f"cannot merge outcomes of {self.n} and {other.n} samples")
        broken_by = tuple(a if a is not None else b
                          for a, b in zip(self.broken_by, other.broken_by))
        rate = None
        if self.fooled_rate is not None or other.fooled_rate is not None:
            mine = self.fooled_rate or tuple(float(b is not None) for b in self.broken_by)
            theirs = other.fooled_rate or tuple(float(b is not None) for b in other.broken_by)
            rate = tuple(max(a, b) for a, b in zip(mine, theirs))
        return SampleOutcomes(broken_by, rate)

    def to_dict(self) -> dict[str, Any]:
        """``broken_by`` and ``fooled_rate`` as JSON-ready lists."""
        return {"broken_by": list(self.broken_by),
                "fooled_rate": None if self.fooled_rate is None else list(self.fooled_rate)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleOutcomes:
        """Rebuild the outcomes from :meth:`to_dict`'s output."""
        return cls(tuple(d["broken_by"]), None if d.get("fooled_rate") is None
                   else tuple(d["fooled_rate"]))


def check_schema(d: Any, current: int, kind: str) -> int:
    """The ``schema_version`` of a stored result dict ``d`` of type ``kind``, checked against the
    version this unmask writes (``current``). A dict without one was written before versions
    were recorded and reads as version 1; a newer version raises ``ValueError`` (its fields may
    mean something this unmask does not know), as does a ``d`` that is not a dict."""
    if not isinstance(d, dict):
        raise TypeError(f"a stored {kind} must be a dict, got {type(d).__name__}")
    version = d.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"a stored {kind} has schema_version {version!r}; expected an int >= 1")
    if version > current:
        raise ValueError(f"this stored {kind} has schema_version {version}, newer than the "
                         f"{current} this unmask reads: upgrade unmask to read it")
    return version
