"""The typed results a suite run stores: the to_dict/from_dict contract, generated over
``unmask.bench.suite.records.STORED_RESULTS`` (a type added there fails here until it has an
example), and the schema versions a suite run writes into the store."""

from __future__ import annotations

import json
import math

import pytest
import torch
from suite_helpers import tiny_suite

from unmask.attacks.ensemble import AttackCost
from unmask.bench.core import SampleOutcomes, Threat, check_schema
from unmask.bench.suite.records import (
    STORED_RESULTS,
    AttributionMaps,
    BackdoorMetrics,
    BatchFailure,
    BatchOutcome,
    CertifyOutcome,
    ExplanationRecord,
)
from unmask.bench.suite.runner import run_suite
from unmask.bench.suite.spec import load_suite
from unmask.bench.suite.store import Store
from unmask.defenses import BackdoorReport, StripResult
from unmask.defenses.certified import CertifyResult
from unmask.defenses.masking import CheckResult, MaskingKind, MaskingReport, Verdict


def _check(name: str = "transfer", passed: bool = False) -> CheckResult:
    return CheckResult(name, 0.25, "transfer beats white-box -> fail", passed, Verdict.SUSPICIOUS,
                       MaskingKind.SHATTERED, "Athalye et al. 2018",
                       evidence={"samples": [1, 4], "p_value": 0.03, "surrogate": "digits-mlp"},
                       skipped=None, cost={"forward": 12, "backward": 4})


def _certify_result() -> CertifyResult:
    return CertifyResult("milp", Threat("linf", 0.05), lower=[0.5, -math.inf, -0.25],
                         status=["certified", "broken", "broken"], seconds=1.5,
                         x_adv=[None, None, [0.0, 0.5, 1.0]])


# One example per stored type, with every optional field set (a field to_dict drops, or
# from_dict reads wrongly, then changes the round trip).
EXAMPLES = {
    BatchOutcome: lambda: BatchOutcome(
        b=2, robust=(True, False, False), clean_correct=(True, True, False),
        broken_by=(None, "apgd-ce", "clean"), margin=(0.75, -0.5, -1.25),
        costs=(("apgd-ce", AttackCost(2, 1, 40, 20, 0.5, rejected=1)),
               ("square", AttackCost(1, 0, 30, 0, 0.25))),
        stochastic=True, draws=(2.0, 1.0), seconds=0.75),
    BatchFailure: lambda: BatchFailure(3, "RuntimeError: boom"),
    CheckResult: _check,
    MaskingReport: lambda: MaskingReport(
        Verdict.SUSPICIOUS, [_check(), _check("fgsm-vs-pgd", True)], "eot-pgd",
        Threat("l2", 0.5), 24, 1.25, gradient_flow="dies at layer 2", collapse_at="relu1",
        follow_up={"before": 0.5, "after": 0.25, "attack": "eot-pgd"},
        outcomes=SampleOutcomes(("clean", None, "eot-pgd"), (1.0, 0.0, 0.75)),
        adaptive={"passed": True, "checks": ["transfer"]}),
    ExplanationRecord: lambda: ExplanationRecord(
        "integrated_gradients", "deletion_auc", 0.125, 8,
        {"steps": 28, "curve": [1.0, 0.5, 0.25], "substrate": "zeros"}),
    AttributionMaps: lambda: AttributionMaps("saliency", [[[0.0, 0.5], [1.0, 0.25]]],
                                             [[[0.125, 0.0], [0.5, 0.25]]]),
    BackdoorMetrics: lambda: BackdoorMetrics(
        target=0, clean_accuracy=0.75, attack_success_rate=0.5, poison_rate=0.1,
        reference_accuracy=0.875, clean_accuracy_cost=0.125, poisoned=40,
        defenses=(("strip_frr", 0.0625), ("strip_far", None))),
    CertifyOutcome: lambda: CertifyOutcome("milp", "ok", "", _certify_result()),
    CertifyResult: _certify_result,
}


@pytest.mark.parametrize("cls", STORED_RESULTS, ids=lambda c: c.__name__)
def test_every_stored_result_round_trips_through_json_with_its_schema_version(cls):
    assert cls in EXAMPLES, f"{cls.__name__} is stored but has no example in EXAMPLES"
    result = EXAMPLES[cls]()
    d = result.to_dict()
    assert d["schema_version"] == cls.SCHEMA_VERSION >= 1
    stored = json.loads(json.dumps(d))  # what the store keeps is JSON
    assert cls.from_dict(stored) == result
    # written before versions were recorded (the stores of earlier releases): reads as 1
    assert cls.from_dict({k: v for k, v in stored.items() if k != "schema_version"}) == result
    newer = {**stored, "schema_version": cls.SCHEMA_VERSION + 1}
    with pytest.raises(ValueError, match="newer"):
        cls.from_dict(newer)


def test_the_records_are_frozen():
    for cls in (BatchOutcome, BatchFailure, ExplanationRecord, AttributionMaps, BackdoorMetrics,
                CertifyOutcome, CertifyResult):
        rec = EXAMPLES[cls]()
        field = next(iter(vars(rec)))
        with pytest.raises(AttributeError):
            setattr(rec, field, None)


def test_check_schema_rejects_what_is_not_a_version():
    assert check_schema({}, 1, "x") == 1
    assert check_schema({"schema_version": 2}, 3, "x") == 2
    for bad in (0, "1", True, 1.0):
        with pytest.raises(ValueError, match="expected an int >= 1"):
            check_schema({"schema_version": bad}, 1, "x")
    with pytest.raises(TypeError, match="must be a dict"):
        check_schema([], 1, "x")


def test_certify_outcome_has_a_result_exactly_when_ok():
    with pytest.raises(ValueError, match="exactly when"):
        CertifyOutcome("ibp", "ok")
    with pytest.raises(ValueError, match="exactly when"):
        CertifyOutcome("ibp", "unavailable", "why", _certify_result())
    with pytest.raises(ValueError, match="one of ok, not supported, unavailable"):
        CertifyOutcome("ibp", "failed", "why")


def test_backdoor_metrics_keep_the_stored_keys_and_their_order():
    """The ``backdoor`` table's rows are the same with and without the typed record: the
    evaluate_backdoor path stores ``BackdoorReport.metrics()`` plus the target, the plain path
    its six numbers."""
    strip = StripResult(threshold=0.5, frr=0.0625, far=0.125, entropy_clean=torch.zeros(2),
                        entropy_triggered=torch.zeros(2))
    report = BackdoorReport(clean_accuracy=0.75, attack_success_rate=0.5, poisoned=40,
                            poison_rate=0.1, reference_accuracy=0.875, strip=strip)
    rec = BackdoorMetrics.of_report(report, target=3)
    assert list(rec.metrics().items()) == list({**report.metrics(), "target": 3}.items())
    assert BackdoorMetrics.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    plain = BackdoorMetrics(target=3, clean_accuracy=0.75, attack_success_rate=0.5,
                            poison_rate=0.1)
    assert list(plain.metrics()) == ["clean_accuracy", "attack_success_rate",
                                     "reference_accuracy", "clean_accuracy_cost", "poison_rate",
                                     "target"]


def test_a_suite_run_stores_its_results_with_their_schema_versions(tmp_path, zoo_cache):
    """The explanation and certification rows of a run (the masking report's versions are
    checked by test_suite's masking runs, through suite_helpers.stored_masking_report: they
    pay for a diagnosis anyway)."""
    extra = ('[explain]\nmethods = ["saliency"]\nmetrics = ["deletion_insertion"]\nn = 4\n'
             'maps = 1\n[certify]\nmethods = ["ibp", "milp"]\nn = 4\ntime_limit = 1\n')
    path = tiny_suite(tmp_path / "s.toml", extra=extra)
    path.write_text(path.read_text().replace("eps = [0.05, 0.1]", "eps = [0.1]")
                    .replace("n = 48", "n = 16"))
    store = tmp_path / "r.sqlite"
    summary = run_suite(load_suite(path), store=store, progress=False)
    assert summary.errors == [] and summary.unavailable == []
    with Store(store, readonly=True) as st:
        explanations = st.rows("explanations", summary.run_id)
        maps = st.rows("explanation_maps", summary.run_id)
        certified = st.rows("certified", summary.run_id)
    assert {r["metric"] for r in explanations} == {"deletion_auc", "insertion_auc"}
    for row in explanations:
        details = json.loads(row["details"])
        assert details["schema_version"] == ExplanationRecord.SCHEMA_VERSION
        rec = ExplanationRecord.from_dict({**{k: row[k] for k in ("method", "metric", "value",
                                                                  "n")}, "details": details})
        assert rec.row()["details"] == details and rec.value == row["value"] and rec.n == 4
    assert [len(json.loads(m["maps"])) for m in maps] == [1]
    assert [(r["method"], r["status"]) for r in certified] == [("ibp", "ok"), ("milp", "ok")]

