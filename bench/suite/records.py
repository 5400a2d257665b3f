"""The typed results a suite run stores, one frozen dataclass per kind of row.

The runner (:mod:`unmask.bench.suite.runner`) calls the feature packages' typed APIs and turns their
results into these records (or stores the feature's own result type, listed in
:data:`STORED_RESULTS` with them). Every stored type has ``to_dict()`` (JSON-ready, with a
``schema_version``) and ``from_dict()`` (reads every version up to its own, refuses a newer
one), and ``from_dict(r.to_dict()) == r``: the contract test is generated over
:data:`STORED_RESULTS`, so a type added there is tested the day it is added.

Usage::

    rec = ExplanationRecord("saliency", "deletion_auc", 0.21, 32, {"steps": 28})
    assert ExplanationRecord.from_dict(rec.to_dict()) == rec
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...attacks.ensemble import AttackCost, EnsembleResult
from ...defenses import BackdoorReport
from ...defenses.certified import CertifyResult
from ...defenses.masking import CheckResult, MaskingReport
from ..core import check_schema

__all__ = ["BatchOutcome", "BatchFailure", "ExplanationRecord", "AttributionMaps",
           "BackdoorMetrics", "CertifyOutcome", "STORED_RESULTS"]


def _cost_from_dict(d: Mapping[str, Any]) -> AttackCost:
    return AttackCost(**{k: d[k] for k in ("attacked", "broken", "forwards", "backwards",
                                           "seconds")}, rejected=d.get("rejected", 0))


@dataclass(frozen=True)
class BatchOutcome:
    """One fixed batch of an attack cell: the ensemble's per-sample outcome on it (what the
    ranks gather and rank 0 merges into the ``cells`` and ``samples`` rows).

    ``b``: the batch index; ``robust``, ``clean_correct``, ``broken_by``, ``margin``: per
    sample, as in :class:`~unmask.attacks.ensemble.EnsembleResult`; ``costs``: per attack label
    its :class:`~unmask.attacks.ensemble.AttackCost`; ``draws``: for a randomised model the
    robust count of each draw (else None); ``seconds``: the batch's wall time."""

    b: int
    robust: tuple[bool, ...]
    clean_correct: tuple[bool, ...]
    broken_by: tuple[str | None, ...]
    margin: tuple[float, ...]
    costs: tuple[tuple[str, AttackCost], ...]
    stochastic: bool
    draws: tuple[float, ...] | None
    seconds: float

    SCHEMA_VERSION = 1

    @classmethod
    def of(cls, b: int, res: EnsembleResult, seconds: float) -> BatchOutcome:
        """The outcome of batch ``b`` from the ensemble's typed result."""
        draws = None
        if res.robust_accuracy_draws is not None:
            draws = tuple((res.robust_accuracy_draws.double() * res.n).tolist())
        return cls(b=b, robust=tuple(res.robust.cpu().tolist()),
                   clean_correct=tuple(res.clean_correct.cpu().tolist()),
                   broken_by=tuple(res.broken_by),
                   margin=tuple(res.margin.detach().cpu().double().tolist()),
                   costs=tuple(res.costs.items()), stochastic=bool(res.stochastic),
                   draws=draws, seconds=seconds)

    def cost(self, label: str) -> AttackCost | None:
        """The cost of attack ``label`` on this batch (None when it did not run here)."""
        return dict(self.costs).get(label)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "b": self.b, "robust": list(self.robust),
                "clean_correct": list(self.clean_correct), "broken_by": list(self.broken_by),
                "margin": list(self.margin),
                "costs": {k: v.to_dict() for k, v in self.costs},
                "stochastic": self.stochastic,
                "draws": None if self.draws is None else list(self.draws),
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchOutcome:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(d, cls.SCHEMA_VERSION, "batch outcome")
        return cls(b=int(d["b"]), robust=tuple(d["robust"]),
                   clean_correct=tuple(d["clean_correct"]), broken_by=tuple(d["broken_by"]),
                   margin=tuple(d["margin"]),
                   costs=tuple((k, _cost_from_dict(v)) for k, v in d["costs"].items()),
                   stochastic=bool(d["stochastic"]),
                   draws=None if d.get("draws") is None else tuple(d["draws"]),
                   seconds=float(d["seconds"]))


@dataclass(frozen=True)
class BatchFailure:
    """A batch whose attacks raised: this rank's share of the cell ends there (every rank still
    reaches the gather); ``error`` is ``"Type: message"``."""

    b: int
    error: str

    SCHEMA_VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "b": self.b, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchFailure:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(d, cls.SCHEMA_VERSION, "batch failure")
        return cls(b=int(d["b"]), error=str(d["error"]))


@dataclass(frozen=True)
class ExplanationRecord:
    """One explanation metric of one method on one model: a row of ``explanations``.

    ``value``: the headline number (e.g. the deletion AUC, the final randomisation
    correlation); ``n``: samples; ``details``: the metric result's own summary
    (``to_dict()`` of :mod:`unmask.explain.metrics`' results), stored as the row's JSON
    ``details`` together with this record's ``schema_version``."""

    method: str
    metric: str
    value: float | None
    n: int
    details: Mapping[str, Any] = field(default_factory=dict)

    SCHEMA_VERSION = 1

    def row(self) -> dict[str, Any]:
        """The ``explanations`` row (without the model): the details carry the version."""
        return {"method": self.method, "metric": self.metric, "value": self.value, "n": self.n,
                "details": {**self.details, "schema_version": self.SCHEMA_VERSION}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "method": self.method,
                "metric": self.metric, "value": self.value, "n": self.n,
                "details": dict(self.details)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExplanationRecord:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(d, cls.SCHEMA_VERSION, "explanation record")
        return cls(method=d["method"], metric=d["metric"], value=d["value"], n=int(d["n"]),
                   details=dict(d.get("details") or {}))


@dataclass(frozen=True)
class AttributionMaps:
    """The first few attribution maps of one method on one model, for the report's figures:
    ``inputs`` the inputs' first channel (``k x H x W``, 3 decimals), ``maps`` the maps'
    absolute value summed over channels (``k x H x W``, 5 decimals)."""

    method: str
    inputs: list[Any]
    maps: list[Any]

    SCHEMA_VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "method": self.method,
                "inputs": self.inputs, "maps": self.maps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttributionMaps:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(d, cls.SCHEMA_VERSION, "attribution maps")
        return cls(method=d["method"], inputs=list(d["inputs"]), maps=list(d["maps"]))


@dataclass(frozen=True)
class BackdoorMetrics:
    """The backdoor section of one backdoored model: clean accuracy, attack success rate, the
    clean-accuracy cost versus the entry's clean reference, the poison rate and target; with
    the suite's ``[backdoor] defenses``, ``poisoned`` and the defenses' numbers (poison
    detection, STRIP, fine-pruning: ``defenses``, in the order
    :meth:`~unmask.defenses.BackdoorReport.metrics` gives them)."""

    target: int
    clean_accuracy: float
    attack_success_rate: float
    poison_rate: float
    reference_accuracy: float | None = None
    clean_accuracy_cost: float | None = None
    poisoned: int | None = None  # None: the defenses did not run
    defenses: tuple[tuple[str, float | None], ...] = ()

    SCHEMA_VERSION = 1
    _HEADLINE = ("poisoned", "poison_rate", "clean_accuracy", "reference_accuracy",
                 "clean_accuracy_cost", "attack_success_rate")

    @classmethod
    def of_report(cls, report: BackdoorReport, target: int) -> BackdoorMetrics:
        """The metrics of :func:`~unmask.defenses.evaluate_backdoor`'s typed report."""
        flat = report.metrics()
        return cls(target=target, clean_accuracy=flat["clean_accuracy"],
                   attack_success_rate=flat["attack_success_rate"],
                   poison_rate=flat["poison_rate"],
                   reference_accuracy=flat["reference_accuracy"],
                   clean_accuracy_cost=flat["clean_accuracy_cost"], poisoned=flat["poisoned"],
                   defenses=tuple((k, v) for k, v in flat.items() if k not in cls._HEADLINE))

    def metrics(self) -> dict[str, Any]:
        """The ``backdoor`` table's ``{metric: value}`` (in the order it has always had)."""
        if self.poisoned is None:
            return {"clean_accuracy": self.clean_accuracy,
                    "attack_success_rate": self.attack_success_rate,
                    "reference_accuracy": self.reference_accuracy,
                    "clean_accuracy_cost": self.clean_accuracy_cost,
                    "poison_rate": self.poison_rate, "target": self.target}
        return {**{k: getattr(self, k) for k in self._HEADLINE}, **dict(self.defenses),
                "target": self.target}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "target": self.target,
                "clean_accuracy": self.clean_accuracy,
                "attack_success_rate": self.attack_success_rate, "poison_rate": self.poison_rate,
                "reference_accuracy": self.reference_accuracy,
                "clean_accuracy_cost": self.clean_accuracy_cost, "poisoned": self.poisoned,
                "defenses": [[k, v] for k, v in self.defenses]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackdoorMetrics:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(d, cls.SCHEMA_VERSION, "backdoor metrics")
        return cls(target=int(d["target"]), clean_accuracy=d["clean_accuracy"],
                   attack_success_rate=d["attack_success_rate"], poison_rate=d["poison_rate"],
                   reference_accuracy=d.get("reference_accuracy"),
                   clean_accuracy_cost=d.get("clean_accuracy_cost"), poisoned=d.get("poisoned"),
                   defenses=tuple((k, v) for k, v in d.get("defenses", [])))


@dataclass(frozen=True)
class CertifyOutcome:
    """One certification method on one model and threat: ``status`` ``ok`` (``result`` the
    :class:`~unmask.defenses.certified.CertifyResult`), ``not supported`` (a layer the
    bounds cannot handle, or MILP under an L2 threat) or ``unavailable`` (the MILP's solver
    ``highspy`` is not installed); ``reason`` says why when not ``ok``."""

    method: str
    status: str
    reason: str = ""
    result: CertifyResult | None = None

    SCHEMA_VERSION = 1
    STATUSES = ("ok", "not supported", "unavailable")

    def __post_init__(self) -> None:
        if self.status not in self.STATUSES:
            raise ValueError(f"status must be one of {', '.join(self.STATUSES)}; "
                             f"got {self.status!r}")
        if (self.result is None) == (self.status == "ok"):
            raise ValueError("a certify outcome has a result exactly when its status is 'ok'")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "method": self.method,
                "status": self.status, "reason": self.reason,
                "result": None if self.result is None else self.result.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CertifyOutcome:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(d, cls.SCHEMA_VERSION, "certify outcome")
        res = d.get("result")
        return cls(method=d["method"], status=d["status"], reason=d.get("reason", ""),
                   result=None if res is None else CertifyResult.from_dict(res))


# Every result type a suite run stores (its own records and the feature packages' results,
# nested ones included: a MaskingReport's CheckResults);
# tests/test_records.py runs the to_dict/from_dict contract over this tuple.
STORED_RESULTS: tuple[type, ...] = (BatchOutcome, BatchFailure, MaskingReport, CheckResult,
                                    ExplanationRecord, AttributionMaps, BackdoorMetrics,
                                    CertifyOutcome, CertifyResult)
