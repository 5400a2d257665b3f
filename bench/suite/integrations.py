"""Adapters between the suite runner and the feature packages it runs.

Each section of a suite (masking diagnosis, explanations, backdoor metrics) goes through one
small adapter here. An adapter first checks that the feature it needs is importable (and, for
zoo-based sections, that the entry exists); when it is not, it raises :class:`Unavailable`
with the reason, and the runner records the section as ``unavailable`` in the store instead
of dropping it or crashing. Features that land later are picked up without code changes.

Adapters return plain dicts of numbers and strings, ready for :mod:`unmask.bench.suite.store`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import data, zoo
from ..core.training import accuracy

__all__ = ["Unavailable", "feature", "diagnose", "masking_row", "note_surrogate",
           "diagnose_masking", "explain_model", "backdoor_metrics",
           "certify_model", "report_outcomes"]

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """A section the suite asks for cannot run here; the message says why."""


def feature(module: str, name: str) -> Callable[..., Any]:
    """``module.name`` if importable, else :class:`Unavailable` naming what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise Unavailable(f"{module} is not importable ({err})") from None
    obj = getattr(mod, name, None)
    if obj is None:
        raise Unavailable(f"{module}.{name} does not exist in this unmask version")
    return obj


# --- masking diagnosis ------------------------------------------------------------------------


def diagnose(model: nn.Module, x: Tensor, y: Tensor, threat, *, follow_up: bool, fast: bool,
             generator: torch.Generator, surrogate: nn.Module | None = None):
    """``unmask.defenses.diagnose`` itself (its typed :class:`MaskingReport`), or
    :class:`Unavailable` when the masking package is not importable."""
    run = feature("unmask.defenses", "diagnose")
    return run(model, x, y, threat, follow_up=follow_up, fast=fast, generator=generator,
               surrogate=surrogate)


def _transfer_check(report) -> Any:
    return next((c for c in report.checks if "transfer" in c.name), None)


def note_surrogate(report, name: str | None, *, used: bool, is_self: bool, why: str) -> None:
    """Name the surrogate in the transfer check's evidence: the one used, or why none was
    (the model is the surrogate itself: a transfer attack from it is the white-box attack
    the diagnosis already ran, so the check says so instead of running it twice)."""
    check = _transfer_check(report)
    if check is None:
        log.warning("the masking report has no transfer check to name the surrogate in")
        return
    check.evidence = {**(check.evidence or {}), "surrogate": name}
    if is_self:
        check.skipped = (f"the model is the surrogate ({name}): a transfer attack from it is "
                         "the white-box attack already run")
    elif not used:
        check.skipped = why or check.skipped


def masking_row(report) -> dict[str, Any]:
    """The ``masking`` table's row of a :class:`MaskingReport`: verdict, failing checks, next
    attack, the follow-up's robust accuracy before/after, and the report itself as JSON
    (per-sample outcomes included: the leaderboard merges them into the row's number)."""
    follow = report.follow_up or {}
    return {"verdict": report.verdict.value, "failing": [c.name for c in report.failed],
            "next_attack": report.recommended_attack,
            "robust_accuracy_before": follow.get("before"),
            "robust_accuracy_after": follow.get("after"),
            "report": json.dumps(report.to_dict(), sort_keys=True, default=str)}


def diagnose_masking(model: nn.Module, x: Tensor, y: Tensor, threat, *, follow_up: bool,
                     fast: bool, generator: torch.Generator,
                     surrogate: nn.Module | None = None) -> dict[str, Any]:
    """:func:`diagnose` flattened by :func:`masking_row` (the pytest helper's view)."""
    return masking_row(diagnose(model, x, y, threat, follow_up=follow_up, fast=fast,
                                generator=generator, surrogate=surrogate))


# --- explanations -----------------------------------------------------------------------------


def _method_options(method: str, ig_steps: int, seed: int) -> dict[str, Any]:
    if method == "integrated_gradients":
        return {"n_steps": ig_steps}
    if method == "smoothgrad":
        return {"generator": seed}
    return {}


def explain_model(model: nn.Module, x: Tensor, y: Tensor, *, methods, metrics, ig_steps: int,
                  maps: int, seed: int, threat=None, backdoor=None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, str]]]:
    """Attributions of each method and their metrics (``unmask.explain.METRICS``) on ``x``.

    Returns ``(metric rows, map rows, problems)``: rows ``{method, metric, value, n,
    details}``; map rows ``{method, inputs, maps}`` with the first ``maps`` pixel maps;
    problems ``(what, reason)`` for metrics that could not be computed (a metric that does not
    apply, e.g. completeness of saliency, is skipped silently).
    """
    attribute = feature("unmask.explain", "attribute")
    registry = feature("unmask.explain.metrics", "METRICS")
    inputs_cls = feature("unmask.explain.metrics", "MetricInputs")
    rows: list[dict[str, Any]] = []
    map_rows: list[dict[str, Any]] = []
    problems: list[tuple[str, str]] = []
    n = int(x.shape[0])

    x_adv = None
    for method in methods:
        opts = _method_options(method, ig_steps, seed)
        try:
            attr = attribute(model, x, y, method, **opts)
        except Exception as err:  # a sibling's bug must not end the run
            problems.append((f"{method}", f"{type(err).__name__}: {err}"))
            continue
        if maps:
            k = min(maps, n)
            map_rows.append({"method": method,
                             "inputs": x[:k, 0].detach().cpu().round(decimals=3).tolist(),
                             "maps": attr[:k].detach().abs().sum(1).cpu().float()
                             .round(decimals=5).tolist()})
        for metric in metrics:
            try:
                entry = registry.get(metric)
                if "x_adv" in entry.needs and x_adv is None and threat is not None:
                    from ...attacks import PGD

                    x_adv = PGD(threat, steps=20)(model, x, y, generator=seed).x_adv
                inputs = inputs_cls(model, x, y, method, attr, opts, seed=seed,
                                    ig_steps=ig_steps, x_adv=x_adv,
                                    trigger=None if backdoor is None else backdoor.trigger,
                                    trigger_target=None if backdoor is None else backdoor.target)
                if not entry.applies(inputs):
                    continue
                for score in entry(inputs):
                    rows.append({"method": method, "metric": score.key, "value": score.value,
                                 "n": n, "details": score.details})
            except Unavailable as err:
                problems.append((f"{method}/{metric}", str(err)))
            except Exception as err:  # a sibling's bug must not end the run
                log.warning("explanation metric %s of %s failed: %s", metric, method, err)
                problems.append((f"{method}/{metric}", f"{type(err).__name__}: {err}"))
    return rows, map_rows, problems


# --- backdoor ---------------------------------------------------------------------------------


def backdoor_of(entry) -> Any:
    """The :class:`~unmask.attacks.backdoor.Backdoor` a zoo entry was trained with."""
    if entry is None or entry.recipe != "backdoor":
        raise Unavailable("not a backdoored zoo entry (recipe 'backdoor')")
    Backdoor = feature("unmask.attacks.backdoor", "Backdoor")
    return Backdoor.from_options(**dict(entry.recipe_options))


def backdoor_metrics(model: nn.Module, entry, x: Tensor, y: Tensor, *, device,
                     defenses: bool, seed: int) -> dict[str, Any]:
    """Clean accuracy, attack success rate and the clean-accuracy cost versus the entry's
    clean reference on ``(x, y)``; with ``defenses`` also poison detection, STRIP and
    fine-pruning (``unmask.defenses.evaluate_backdoor``)."""

    backdoor = backdoor_of(entry)
    options = dict(entry.recipe_options)
    reference = options.get("clean_reference")
    ref_acc = None
    if reference is not None and reference in zoo.list():
        ref_model = zoo.load(reference, device=device, progress=False)
        ref_acc = accuracy(ref_model, x, y)
    if defenses:
        evaluate_backdoor = feature("unmask.defenses", "evaluate_backdoor")

        x_train, y_train = data.load(entry.dataset, "train")
        poison_seed = options.get("poison_seed")
        poisoned = backdoor.poison(x_train, y_train,
                                   generator=poison_seed if poison_seed is not None
                                   else entry.seed)
        report = evaluate_backdoor(model, backdoor, poisoned, x, y, reference_accuracy=ref_acc,
                                   generator=seed)
        metrics = dict(report.metrics())
    else:
        clean = accuracy(model, x, y)
        metrics = {"clean_accuracy": clean,
                   "attack_success_rate": backdoor.attack_success_rate(model, x, y),
                   "reference_accuracy": ref_acc,
                   "clean_accuracy_cost": None if ref_acc is None else ref_acc - clean,
                   "poison_rate": backdoor.rate}
    metrics["target"] = backdoor.target
    return metrics


# --- certified bounds -------------------------------------------------------------------------


def certify_model(model: nn.Module, x: Tensor, y: Tensor, threat, *, methods, time_limit: float
                  ) -> list[dict[str, Any]]:
    """Certify ``(x, y)`` against ``threat`` with each of ``methods``
    (``unmask.defenses.certified.certify``).

    Returns one dict per method: ``{"method", "status", "reason", "result"}`` with status
    ``ok`` (``result`` the :class:`CertifyResult`), ``not supported`` (a layer the bounds
    cannot handle, or MILP under an L2 threat; ``reason`` names it) or ``unavailable`` (the
    MILP's solver ``highspy`` is not installed). Raises :class:`Unavailable` when the certified
    package itself is not importable; any other failure propagates (the runner records it).
    """
    certify = feature("unmask.defenses.certified", "certify")
    not_supported = feature("unmask.defenses.certified", "NotSupportedError")
    out: list[dict[str, Any]] = []
    for method in methods:
        row: dict[str, Any] = {"method": method, "status": "ok", "reason": "", "result": None}
        if method == "milp" and threat.norm.value != "linf":
            row.update(status="not supported", reason="not supported: milp needs a linf threat "
                       "(an L2 ball is not linear)")
        elif method == "milp" and importlib.util.find_spec("highspy") is None:
            row.update(status="unavailable", reason="the MILP solver highspy is not installed "
                       "(pip install 'unmask[certified]')")
        else:
            try:
                row["result"] = certify(model, x, y, threat, method=method,
                                        time_limit=time_limit)
            except not_supported as err:
                row.update(status="not supported", reason=str(err))
        out.append(row)
    return out


def report_outcomes(masking_row: dict[str, Any] | None):
    """The per-sample outcomes (:class:`~unmask.bench.core.SampleOutcomes`) of a stored
    masking diagnosis, or None when the row holds none."""
    if masking_row is None:
        return None
    try:
        MaskingReport = feature("unmask.defenses", "MaskingReport")
        return MaskingReport.from_dict(json.loads(masking_row["report"])).outcomes
    except Exception:  # an older or hand-written row: no per-sample outcomes
        return None
