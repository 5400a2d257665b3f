"""The diagnosis's result types: the verdict, the kinds of masking, one check's result and the
report (serialisable both ways, so a stored report reads back as it was written)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...bench.core import SampleOutcomes, StrEnum, Threat, check_schema
from ...bench.core.fileio import json_safe
from ...bench.core.text import text_table

__all__ = ["Verdict", "VERDICT_MEANING", "MaskingKind", "CheckResult", "MaskingReport"]


class Verdict(StrEnum):
    """The diagnosis's verdict: ``clean`` (no check fired), ``suspicious`` (only heuristic checks
    fired) or ``masked`` (a mechanism check fired); see ``VERDICT_MEANING``.
    """
    CLEAN = "clean"
    SUSPICIOUS = "suspicious"
    MASKED = "masked"


# One line per verdict, for the leaderboard's legend, the README and `unmask diagnose`.
VERDICT_MEANING = {
    "clean": "no check fired: the robust accuracy is a measurement; rank on it",
    "suspicious": "a heuristic check fired: the number may be optimistic; read the failing "
                  "checks and the follow-up before trusting the rank",
    "masked": "a mechanism check fired: the number is not evidence of robustness and is not "
              "ranked; run the named adaptive attack",
}


class MaskingKind(StrEnum):
    """What a failed check points to (Athalye et al. 2018's taxonomy, plus the attack's own
    shortfall of Pintor et al. 2022's indicators of attack failure)."""

    SHATTERED = "shattered"  # non-differentiable or broken gradients
    STOCHASTIC = "stochastic"  # randomised gradients
    VANISHING = "vanishing/exploding"  # gradients that exist but carry no slope
    WEAK_ATTACK = "weak attack"  # the optimisation, not the model, falls short


@dataclass
class CheckResult:
    """One check on one model: the measured ``value``, the decision ``rule``, ``passed``, the
    verdict a failure implies (``severity``), the masking ``kind``, the literature ``source``,
    the ``evidence`` (per-sample indices, rates, p-values), ``skipped`` (why it could not run)
    and ``cost``: the forward and backward passes (sample rows) it spent."""

    name: str
    value: float | None
    rule: str
    passed: bool
    severity: Verdict  # the verdict a failure implies
    kind: MaskingKind
    source: str
    evidence: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    cost: dict[str, int] | None = None

    SCHEMA_VERSION = 1  # of to_dict; from_dict reads every version up to it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "name": self.name, "value": self.value,
                "rule": self.rule,
                "passed": self.passed, "severity": self.severity.value, "kind": self.kind.value,
                "source": self.source, "evidence": json_safe(self.evidence),
                "skipped": self.skipped, "cost": self.cost}

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> CheckResult:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(c, cls.SCHEMA_VERSION, "masking check result")
        return cls(c["name"], c["value"], c["rule"], c["passed"], Verdict(c["severity"]),
                   MaskingKind(c["kind"]), c["source"], c.get("evidence") or {},
                   c.get("skipped"), c.get("cost"))


@dataclass
class MaskingReport:
    """The diagnosis of one model under one threat: every check's result, the verdict, the
    next attack, and (with ``follow_up=True``) the follow-up's figures, the per-sample
    ``outcomes`` the leaderboard merges, and ``adaptive``: the checks re-run against the
    follow-up's adaptive attack (:attr:`rankable` when they pass)."""

    verdict: Verdict
    checks: list[CheckResult]
    recommended_attack: str
    threat: Threat
    n: int
    seconds: float
    gradient_flow: str | None = None
    collapse_at: str | None = None
    follow_up: dict[str, Any] | None = None
    outcomes: SampleOutcomes | None = None
    adaptive: dict[str, Any] | None = None

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that ran and fired (skipped checks excluded)."""
        return [c for c in self.checks if not c.passed and c.skipped is None]

    @property
    def rankable(self) -> bool:
        """Not masked, or masked but the adaptive re-checks passed."""
        return self.verdict is not Verdict.MASKED or bool(self.adaptive
                                                          and self.adaptive.get("passed"))

    SCHEMA_VERSION = 1  # of to_dict (the store's ``masking.report``); from_dict reads <= it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; :meth:`from_dict` reads it back."""
        return {"schema_version": self.SCHEMA_VERSION, "verdict": self.verdict.value,
                "recommended_attack": self.recommended_attack,
                "threat": self.threat.to_dict(), "n": self.n, "seconds": round(self.seconds, 3),
                "gradient_flow": self.gradient_flow, "collapse_at": self.collapse_at,
                "checks": [c.to_dict() for c in self.checks],
                "follow_up": json_safe(self.follow_up),
                "outcomes": None if self.outcomes is None else self.outcomes.to_dict(),
                "adaptive": json_safe(self.adaptive)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskingReport:
        """Rebuild from :meth:`to_dict`'s output; an older schema version is read, a newer one
        is a ``ValueError``."""
        check_schema(d, cls.SCHEMA_VERSION, "masking report")
        checks = [CheckResult.from_dict(c) for c in d.get("checks", [])]
        t = d["threat"]
        outcomes = d.get("outcomes")
        return cls(Verdict(d["verdict"]), checks, d.get("recommended_attack", ""),
                   Threat(t["norm"], t["eps"]), d["n"], d.get("seconds", 0.0),
                   d.get("gradient_flow"), d.get("collapse_at"), d.get("follow_up"),
                   None if outcomes is None else SampleOutcomes.from_dict(outcomes),
                   d.get("adaptive"))

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string (:meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """The checks as a plain-text table: value, rule, pass / skip / FAIL->severity, kind."""
        rows = []
        for c in self.checks:
            result = "skip" if c.skipped else ("pass" if c.passed else f"FAIL->{c.severity.value}")
            value = "-" if c.value is None else (f"{c.value:.3g}" if isinstance(c.value, float)
                                                 else str(c.value))
            rows.append((c.name, value, c.rule, result, c.kind.value))
        lines = [text_table(rows, ("check", "value", "rule", "result", "kind")), ""]
        lines.append(f"verdict: {self.verdict.value}   next: {self.recommended_attack}")
        lines.append(f"  ({VERDICT_MEANING[self.verdict.value]})")
        if self.gradient_flow:
            lines.append(f"gradient flow: {self.gradient_flow}")
        if self.follow_up:
            f = self.follow_up
            lines.append(f"follow-up ({f['attack']}): robust accuracy {f['before']:.3f} -> "
                         f"{f['after']:.3f} on {f['n']} samples")
            if "after_expected" in f:
                lines.append(f"  in expectation over {f['draws']} draws of the model's "
                             f"randomness: {f['before_expected']:.3f} -> "
                             f"{f['after_expected']:.3f}")
        if self.adaptive:
            a = self.adaptive
            state = "pass: ranked as adaptive" if a.get("passed") else "still failing"
            lines.append(f"adaptive re-checks against {a['attack']}: {state}"
                         + (f" ({', '.join(a['failed'])})" if a.get("failed") else ""))
        return "\n".join(lines)
