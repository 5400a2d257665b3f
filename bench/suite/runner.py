"""Run a suite: the data flow of DESIGN.md, one store transaction per finished unit.

For every model of the suite (zoo entry trained or loaded from the cache, or a user's
``module:function``), on the suite's samples of its dataset:

1. per threat, the attack ensemble (cascade on the samples still robust) over fixed batches
   -> ``cells`` (one per attack plus ``worst-case``) and per-sample outcomes;
2. per threat, the masking diagnosis (``unmask.defenses.diagnose``) -> ``masking``;
3. explanations and their metrics (``unmask.explain``) -> ``explanations``;
4. backdoor metrics for backdoored entries -> ``backdoor``;
5. per threat, ``[certify]``: proven lower bounds (IBP, CROWN, exact MILP) on the first
   ``n`` samples -> ``certified`` and ``certified_samples``; a model the bounds do not apply
   to records ``not supported: <layer>``. A sample certified robust that any attack of the
   row broke (the ensemble or the masking diagnosis) is a soundness bug: the run stops with
   :class:`CertifiedSoundnessError` naming the model, threat and sample.

Each of these units is committed in its own transaction; ``resume=RUN_ID`` skips the units
already finished, so an interrupted run resumed gives the same table as an uninterrupted one.
A section that cannot run (a feature not installed, an optional zoo entry missing) is stored
as ``unavailable`` with its reason; a section that fails is stored as ``error`` with its
message, and the run goes on with the next unit. One broken model never stops a run: a builder
that raises, an output that is not ``N x K`` logits or non-finite logits are that model's
error. Errors are not finished units: ``--resume`` runs them again (after a fix), and a
resumed run can drop models (``skip``) or take an edited suite whose cells are unchanged.

Randomised models: a sample is robust iff it is classified correctly on a strict majority of
``[attacks] draws`` (:data:`unmask.bench.core.DRAWS`) fresh draws
(:func:`unmask.bench.core.robust_by_majority`); the worst-case cell's robust accuracy is the
share of robust samples with its Wilson interval, and ``robust_accuracy_std`` the spread of the
per-draw accuracy (secondary evidence).

Determinism: the samples are cut into fixed batches of ``batch_size`` and batch ``b`` draws
its randomness from a generator seeded with ``(seed, b)``, so the result does not depend on
how batches are distributed. Under ``torchrun`` (``WORLD_SIZE > 1``) the batches are sharded
round-robin over the ranks with ``torch.distributed`` (Gloo on CPU, NCCL on GPUs), gathered
on rank 0, and rank 0 alone writes the store; the table equals the single-process one.

Usage::

    summary = run_suite(load_suite(None), store="results/unmask.sqlite")
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...attacks import PGD, Ensemble
from ...attacks.backdoor import Backdoor
from ...defenses import evaluate_backdoor
from ...defenses.certified import NotSupportedError, SoundnessError, assert_sound, certify
from ...defenses.masking import MaskingReport, diagnose
from ...explain import attribute
from ...explain.metrics import METRICS, MetricInputs
from .. import data, zoo
from ..core import (
    ProbabilityOutputWarning,
    SampleOutcomes,
    Threat,
    make_generator,
    model_mode,
    select_device,
    threat_key,
)
from ..core.training import accuracy
from ..zoo.registry import fingerprint, versions
from ..zoo.resolve import ModelSourceError
from . import curves
from .records import (
    AttributionMaps,
    BackdoorMetrics,
    BatchFailure,
    BatchOutcome,
    CertifyOutcome,
    ExplanationRecord,
)
from .spec import (
    SURROGATE_AUTO,
    SURROGATE_NONE,
    ModelSpec,
    Suite,
    default_surrogate,
    parse_suite,
    resolve_user_model,
)
from .store import WORST_CASE, Store, StoreError, default_path, unit_key, wilson

__all__ = ["run_suite", "RunSummary", "RunInterrupted", "batch_seed", "evaluate_cell",
           "git_commit", "CertifiedSoundnessError", "SectionUnavailable", "explain_model",
           "backdoor_of", "backdoor_metrics", "certify_methods", "note_surrogate",
           "masking_row", "stored_outcomes"]

log = logging.getLogger(__name__)


class SectionUnavailable(Exception):
    """A section the suite asks for cannot run here, for a typed reason (an optional zoo entry
    or user model that is not there, a backdoor section for a model without a backdoor); the
    message says why and the runner records the section as ``unavailable``."""


class CertifiedSoundnessError(RuntimeError):
    """A sample was certified robust and an attack of the same run broke it: the bounds or the
    attack are wrong, so no number of the run can be trusted; the run stops."""


@dataclass
class RunSummary:
    """What a run did: its id, the units run and skipped, and what could not run."""

    run_id: int
    store: Path
    status: str
    wall_seconds: float
    units_run: int = 0
    units_skipped: int = 0
    unavailable: list[tuple[str, str, str]] = field(default_factory=list)  # model, section, why
    errors: list[tuple[str, str, str]] = field(default_factory=list)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``'s generator: a function of ``(seed, batch)`` only."""
    digest = hashlib.sha256(f"unmask-batch:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The git commit of the unmask source tree, if any; ``+dirty`` when its code (Python
    files, suites, ``pyproject.toml``) differs from the commit. Results, docs and the README
    do not count: a run that regenerates the committed results names the commit it ran."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                "--untracked-files=no", "--", ":(top,glob)**/*.py",
                                ":(top,glob)**/*.toml"], capture_output=True, text=True,
                               timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --- torch.distributed ------------------------------------------------------------------------


class _Dist:
    """Rank bookkeeping; a single process is world size 1 with no collective calls."""

    def __init__(self, device: torch.device | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        self.device = device
        if self.world > 1:

            if not dist.is_initialized():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
                if use_cuda:
                    torch.cuda.set_device(local)
                    self.device = torch.device("cuda", local)
                backend = "nccl" if use_cuda else "gloo"
                # Rank 0 alone runs the masking diagnosis and explanations while the others
                # wait at the next gather: allow hours, not the default 30 minutes.
                dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
                self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        if self.world == 1:
            return [obj]

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self, ok: bool = True) -> None:
        if self.owned:

            if ok:  # after an error the other ranks may never arrive: do not wait for them
                with contextlib.suppress(Exception):
                    dist.barrier()
            dist.destroy_process_group()


# --- one cell ---------------------------------------------------------------------------------


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _run_batch(ensemble: Ensemble, model: nn.Module, x: Tensor, y: Tensor, seed: int, b: int,
               progress: bool) -> BatchOutcome:
    ensemble.progress = progress
    start = time.perf_counter()
    res = ensemble(model, x, y, generator=make_generator(batch_seed(seed, b)))
    return BatchOutcome.of(b, res, time.perf_counter() - start)


def evaluate_cell(ensemble: Ensemble, model: nn.Module, x: Tensor, y: Tensor, *, seed: int,
                  batch_size: int, rank: int = 0, world: int = 1,
                  progress: bool = False, desc: str = "",
                  raise_errors: bool = False) -> list[BatchOutcome | BatchFailure]:
    """Run ``ensemble`` on this rank's share of the fixed batches; per-batch outcomes.

    An exception in a batch ends this rank's share with one :class:`BatchFailure` entry
    (every rank still reaches the gather, so a failing model cannot hang a torchrun); with
    ``raise_errors`` it propagates (one model in one process: the pytest helper and
    ``unmask attack``, which evaluate through this function so their numbers are the suite's)."""
    spans = _batches(int(x.shape[0]), batch_size)
    mine = [b for b in range(len(spans)) if b % world == rank]
    out = []
    bar = tqdm(mine, desc=desc, disable=not progress, leave=False, unit="batch")
    for b in bar:
        s, e = spans[b]
        try:
            out.append(_run_batch(ensemble, model, x[s:e].clone(), y[s:e].clone(), seed, b,
                                  progress))
        except Exception as err:
            if raise_errors:
                bar.close()
                raise
            out.append(BatchFailure(b, _message(err)))
            break
    bar.close()
    return out


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def merge_cell(parts: list[BatchOutcome], labels: list[str], y: Tensor, *, model: str,
               norm: str, eps: float, sha256: str | None, source: str
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-batch outcomes (any order, any rank) -> cell rows and sample rows."""
    parts = sorted(parts, key=lambda p: p.b)
    robust = [r for p in parts for r in p.robust]
    clean = [c for p in parts for c in p.clean_correct]
    broken_by = [b for p in parts for b in p.broken_by]
    margins = [m for p in parts for m in p.margin]
    n = len(robust)
    if n != int(y.shape[0]):
        raise RuntimeError(f"gathered {n} samples, expected {int(y.shape[0])}")
    bad = sum(not math.isfinite(m) for m in margins)
    if bad:  # NaN is no robustness: the cell is an error, not a number
        raise ValueError(f"model {model!r} returned non-finite logits (NaN or Inf) during the "
                         f"attacks: no finite margin for {bad} of {n} samples")
    stochastic = any(p.stochastic for p in parts)
    n_clean = sum(bool(c) for c in clean)
    common = {"model": model, "norm": norm, "eps": float(eps), "n": n,
              "clean_correct": n_clean, "clean_accuracy": n_clean / n,
              "stochastic": int(stochastic), "checkpoint_sha256": sha256, "model_source": source}
    cells = []
    still = n_clean
    total = {"attacked": 0, "broken": 0, "forwards": 0, "backwards": 0}
    for pos, label in enumerate(labels):
        costs = [c for c in (p.cost(label) for p in parts) if c is not None]
        agg = {k: sum(getattr(c, k) for c in costs)
               for k in ("attacked", "broken", "forwards", "backwards", "seconds")}
        still -= agg["broken"]
        for k in total:
            total[k] += agg[k]
        lo, hi = wilson(still, n)
        cells.append({**common, "attack": label, "position": pos, "robust": still,
                      "robust_accuracy": still / n, "ci_low": lo, "ci_high": hi,
                      "robust_accuracy_std": 0.0, "attacked": agg["attacked"],
                      "broken": agg["broken"], "forwards": agg["forwards"],
                      "backwards": agg["backwards"], "wall_seconds": agg["seconds"]})
    n_robust = sum(bool(r) for r in robust)
    # One definition for every model: the share of samples robust (for a randomised model,
    # robust by majority over the draws, decided per sample by the ensemble), with the Wilson
    # interval over samples. The spread of the per-draw accuracy is secondary evidence.
    robust_acc, std = n_robust / n, 0.0
    if stochastic and all(p.draws is not None for p in parts):
        per_draw = [sum(vals) / n for vals in zip(*[p.draws for p in parts])]
        mean = sum(per_draw) / len(per_draw)
        std = (sum((v - mean) ** 2 for v in per_draw) / len(per_draw)) ** 0.5
    lo, hi = wilson(n_robust, n)
    cells.append({**common, "attack": WORST_CASE, "position": len(labels), "robust": n_robust,
                  "robust_accuracy": robust_acc, "ci_low": lo, "ci_high": hi,
                  "robust_accuracy_std": std, "attacked": n_clean, "broken": n_clean - n_robust,
                  "forwards": total["forwards"], "backwards": total["backwards"],
                  "wall_seconds": sum(p.seconds for p in parts)})
    labels_list = y.cpu().tolist()
    samples = [{"model": model, "norm": norm, "eps": float(eps), "sample": i,
                "label": int(labels_list[i]), "clean_correct": int(bool(clean[i])),
                "robust": int(bool(robust[i])), "broken_by": broken_by[i],
                "margin": float(margins[i])} for i in range(n)]
    return cells, samples


# --- the sections: typed calls into the feature packages --------------------------------------


def note_surrogate(report: MaskingReport, name: str | None, *, used: bool, is_self: bool,
                   why: str) -> MaskingReport:
    """``report`` with the transfer check's evidence naming the surrogate: the one used, or
    why none was (the model is the surrogate itself: a transfer attack from it is the
    white-box attack the diagnosis already ran, so the check says so instead of running it
    twice). The report passed in is left as it was."""
    pos = next((i for i, c in enumerate(report.checks) if "transfer" in c.name), None)
    if pos is None:
        log.warning("the masking report has no transfer check to name the surrogate in")
        return report
    check = report.checks[pos]
    skipped = check.skipped
    if is_self:
        skipped = (f"the model is the surrogate ({name}): a transfer attack from it is "
                   "the white-box attack already run")
    elif not used:
        skipped = why or skipped
    noted = replace(check, evidence={**(check.evidence or {}), "surrogate": name},
                    skipped=skipped)
    return replace(report, checks=[*report.checks[:pos], noted, *report.checks[pos + 1:]])


def masking_row(report: MaskingReport) -> dict[str, Any]:
    """The ``masking`` table's row of a :class:`MaskingReport`: verdict, failing checks, next
    attack, the follow-up's robust accuracy before/after, and the report itself as JSON with
    its ``schema_version`` (per-sample outcomes included: the leaderboard merges them into
    the row's number)."""
    follow = report.follow_up or {}
    return {"verdict": report.verdict.value, "failing": [c.name for c in report.failed],
            "next_attack": report.recommended_attack,
            "robust_accuracy_before": follow.get("before"),
            "robust_accuracy_after": follow.get("after"),
            "report": json.dumps(report.to_dict(), sort_keys=True, default=str)}


def stored_outcomes(masking: dict[str, Any] | None):
    """The per-sample outcomes (:class:`~unmask.bench.core.SampleOutcomes`) of a stored
    ``masking`` row, or None when there is no row or its report holds none."""
    if masking is None:
        return None
    return MaskingReport.from_dict(json.loads(masking["report"])).outcomes


def _method_options(method: str, ig_steps: int, seed: int) -> dict[str, Any]:
    """The attribution options the suite sets per method: IG's steps, SmoothGrad's seed."""
    if method == "integrated_gradients":
        return {"n_steps": ig_steps}
    if method == "smoothgrad":
        return {"generator": seed}
    return {}


def _explain_metric(model: nn.Module, x: Tensor, y: Tensor, attr: Tensor, method: str,
                    metric: str, *, ig_steps: int, seed: int, threat: Threat | None,
                    backdoor: Backdoor | None, adversarial: dict[str, Tensor]
                    ) -> list[ExplanationRecord]:
    """The records of one registered metric (:data:`unmask.explain.metrics.METRICS`) of one
    method's maps ``attr`` on ``(x, y)``; none when the metric does not apply (its
    ``applies``: completeness of a method other than IG, the adversarial change without a
    threat, trigger localisation without a backdoor). ``adversarial`` caches the PGD
    examples across methods."""
    entry = METRICS.get(metric)
    if "x_adv" in entry.needs and "x_adv" not in adversarial and threat is not None:
        adversarial["x_adv"] = PGD(threat, steps=20)(model, x, y, generator=seed).x_adv
    inputs = MetricInputs(model, x, y, method, attr, _method_options(method, ig_steps, seed),
                          seed=seed, ig_steps=ig_steps, x_adv=adversarial.get("x_adv"),
                          trigger=None if backdoor is None else backdoor.trigger,
                          trigger_target=None if backdoor is None else backdoor.target)
    if not entry.applies(inputs):
        return []
    n = int(x.shape[0])
    return [ExplanationRecord(method, s.key, s.value, n, s.details) for s in entry(inputs)]


def explain_model(model: nn.Module, x: Tensor, y: Tensor, *, methods, metrics, ig_steps: int,
                  maps: int, seed: int, threat: Threat | None = None,
                  backdoor: Backdoor | None = None
                  ) -> tuple[list[ExplanationRecord], list[AttributionMaps],
                             list[tuple[str, str, str]]]:
    """Attributions of each method (:func:`unmask.explain.attribute`) and their metrics
    (:mod:`unmask.explain.metrics`) on ``x``.

    Returns ``(records, maps, problems)``: one :class:`ExplanationRecord` per method and
    metric value; the first ``maps`` pixel maps per method (:class:`AttributionMaps`);
    problems ``(what, status, reason)`` for a method or metric that raised: ``unavailable``
    for an ``ImportError`` (an optional dependency not installed), else ``error``. A metric
    that does not apply (e.g. completeness of saliency) is skipped silently.
    """
    records: list[ExplanationRecord] = []
    map_rows: list[AttributionMaps] = []
    problems: list[tuple[str, str, str]] = []
    adversarial: dict[str, Tensor] = {}
    n = int(x.shape[0])

    def problem(what: str, err: Exception) -> None:
        status = "unavailable" if isinstance(err, ImportError) else "error"
        log.warning("explanation %s failed: %s", what, err)
        problems.append((what, status, _message(err)))

    for method in methods:
        try:
            attr = attribute(model, x, y, method, **_method_options(method, ig_steps, seed))
        except Exception as err:  # one method's failure must not end the section
            problem(method, err)
            continue
        if maps:
            k = min(maps, n)
            map_rows.append(AttributionMaps(
                method, x[:k, 0].detach().cpu().round(decimals=3).tolist(),
                attr[:k].detach().abs().sum(1).cpu().float().round(decimals=5).tolist()))
        for metric in metrics:
            try:
                records += _explain_metric(model, x, y, attr, method, metric,
                                           ig_steps=ig_steps, seed=seed, threat=threat,
                                           backdoor=backdoor, adversarial=adversarial)
            except Exception as err:  # one metric's failure must not end the section
                problem(f"{method}/{metric}", err)
    return records, map_rows, problems


def backdoor_of(entry) -> Backdoor:
    """The :class:`~unmask.attacks.backdoor.Backdoor` a zoo entry was trained with;
    :class:`SectionUnavailable` for an entry without one (not recipe ``backdoor``)."""
    if entry is None or entry.recipe != "backdoor":
        raise SectionUnavailable("not a backdoored zoo entry (recipe 'backdoor')")
    return Backdoor.from_options(**dict(entry.recipe_options))


def backdoor_metrics(model: nn.Module, entry, x: Tensor, y: Tensor, *, device,
                     defenses: bool, seed: int) -> BackdoorMetrics:
    """Clean accuracy, attack success rate and the clean-accuracy cost versus the entry's
    clean reference on ``(x, y)``; with ``defenses`` also poison detection, STRIP and
    fine-pruning (:func:`unmask.defenses.evaluate_backdoor`)."""
    backdoor = backdoor_of(entry)
    options = dict(entry.recipe_options)
    reference = options.get("clean_reference")
    ref_acc = None
    if reference is not None and reference in zoo.list():
        ref_model = zoo.load(reference, device=device, progress=False)
        ref_acc = accuracy(ref_model, x, y)
    if defenses:
        x_train, y_train = data.load(entry.dataset, "train")
        poison_seed = options.get("poison_seed")
        poisoned = backdoor.poison(x_train, y_train,
                                   generator=poison_seed if poison_seed is not None
                                   else entry.seed)
        report = evaluate_backdoor(model, backdoor, poisoned, x, y, reference_accuracy=ref_acc,
                                   generator=seed)
        return BackdoorMetrics.of_report(report, backdoor.target)
    clean = accuracy(model, x, y)
    return BackdoorMetrics(target=backdoor.target, clean_accuracy=clean,
                           attack_success_rate=backdoor.attack_success_rate(model, x, y),
                           poison_rate=backdoor.rate, reference_accuracy=ref_acc,
                           clean_accuracy_cost=None if ref_acc is None else ref_acc - clean)


def certify_methods(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, methods,
                    time_limit: float) -> list[CertifyOutcome]:
    """Certify ``(x, y)`` against ``threat`` with each of ``methods``
    (:func:`unmask.defenses.certified.certify`): one :class:`CertifyOutcome` per method.

    ``not supported``: a layer the bounds cannot handle (:class:`NotSupportedError`), or
    MILP under an L2 threat; ``unavailable``: the MILP's solver ``highspy`` is not installed
    (importing it raises ``ImportError``). Any other failure propagates (the runner records it)."""
    out: list[CertifyOutcome] = []
    for method in methods:
        if method == "milp" and threat.norm.value != "linf":
            out.append(CertifyOutcome(method, "not supported", "not supported: milp needs a "
                                      "linf threat (an L2 ball is not linear)"))
            continue
        if method == "milp":
            # The MILP's solver is an optional heavy dependency, imported by the MILP only for
            # samples CROWN leaves undecided: ask for it up front, so whether the method runs
            # never depends on the samples.
            try:
                importlib.import_module("highspy")
            except ImportError:
                out.append(CertifyOutcome(method, "unavailable", "the MILP solver highspy is "
                                          "not installed (pip install 'unmask[certified]')"))
                continue
        try:
            out.append(CertifyOutcome(method, "ok", "", certify(model, x, y, threat,
                                                                method=method,
                                                                time_limit=time_limit)))
        except NotSupportedError as err:
            out.append(CertifyOutcome(method, "not supported", str(err)))
    return out


# --- the run ----------------------------------------------------------------------------------


def _state_sha256(model: nn.Module) -> str:
    return fingerprint(model)


@dataclass
class _Loaded:
    model: nn.Module
    sha256: str | None
    source: str
    entry: Any = None


def _load_model(spec: ModelSpec, device: torch.device, progress: bool) -> _Loaded:
    """The model of ``spec``, or :class:`SectionUnavailable` when an optional one is not there
    (a user model whose module does not import, a zoo entry not registered here)."""
    if spec.is_user:
        try:
            model = resolve_user_model(spec).to(device)
        except ModelSourceError as err:
            if spec.optional and isinstance(err.__cause__, ImportError):
                raise SectionUnavailable(str(err)) from None
            raise
        return _Loaded(model, _state_sha256(model), "user")
    if spec.name not in zoo.list():
        raise SectionUnavailable(
            f"zoo entry {spec.name!r} is not registered in this unmask installation "
            "(its feature has not landed or its package is not importable)")
    model, card = zoo.load_with_card(spec.name, device=device, progress=progress)
    return _Loaded(model, _state_sha256(model), "zoo", zoo.get(spec.name))


@contextlib.contextmanager
def _rng_untouched(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Leave every random stream as it was: the global ones and the generators a module owns
    (a randomised defense's noise), so a probe pass does not shift the draws of the
    evaluation that follows (the suite's numbers equal the pytest helper's)."""
    owned = [(g, g.get_state()) for mod in model.modules() for g in vars(mod).values()
             if isinstance(g, torch.Generator)]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for g, state in owned:
                g.set_state(state)


def probe_model(model: nn.Module, x: Tensor, y: Tensor, name: str) -> None:
    """One forward pass on ``x`` (a batch of the suite's samples): the output must be finite
    ``N x K`` logits with a class for every label. Raises ``ValueError`` naming ``name`` and
    what was wrong, so the row shows it instead of an attack crashing on it later."""

    with model_mode(model), torch.no_grad(), _rng_untouched(model, x.device):
        out = model(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model {name!r} returned {shape} for a batch of {x.shape[0]} inputs; "
                         f"expected logits of shape ({x.shape[0]}, K)")
    k = int(out.shape[1])
    top = int(y.max()) if y.numel() else -1
    if top >= k:
        raise ValueError(f"model {name!r} returns {k} classes, but the data has label {top}")
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        share = 1.0 - float(finite.float().mean())
        raise ValueError(f"model {name!r} returned non-finite logits (NaN or Inf) in "
                         f"{share:.1%} of its outputs on {x.shape[0]} samples")


def _channels_last(model: nn.Module) -> nn.Module:
    """The model with its 4-d parameters and buffers in channels_last memory format (the
    checkpoint hash is taken before: the values do not change, only their layout)."""
    return model.to(memory_format=torch.channels_last)


class _Runner:
    def __init__(self, suite: Suite, store: Store | None, run_id: int, done: set[str],
                 dist: _Dist, device: torch.device, progress: bool) -> None:
        self.suite = suite
        self.store = store
        self.run_id = run_id
        self.done = done
        self.dist = dist
        self.device = device
        self.progress = progress and dist.main
        self.summary_run = 0
        self.summary_skip = 0
        self.unavailable: list[tuple[str, str, str]] = []
        self.errors: list[tuple[str, str, str]] = []
        self._surrogate: tuple[str | None, nn.Module | None, str] | None = None
        self._surrogate_sha: str | None = None

    # units --------------------------------------------------------------------------------

    def _is_done(self, unit: str) -> bool:
        if unit in self.done:
            self.summary_skip += 1
            return True
        return False

    @contextlib.contextmanager
    def _unit(self, unit: str, seconds: float,
              clears: tuple[str, str, str] | None = None) -> Iterator[Any]:
        """Write one finished unit; ``clears`` (model, section, detail): the error an earlier
        attempt of this unit recorded, now superseded."""
        assert self.store is not None  # only rank 0 writes
        with self.store.unit(self.run_id, unit, seconds) as tx:
            if clears is not None:
                tx.clear_section(*clears)
            yield tx
        self.done.add(unit)
        log.info("saved %s (%.1fs)", unit, seconds)
        self.summary_run += 1

    def _section(self, unit: str, model: str, section: str, status: str, reason: str,
                 detail: str = "") -> None:
        """Record a section that could not run (rank 0). ``unavailable`` is a finished unit
        (resuming cannot change it); an ``error`` is not: ``--resume`` runs it again."""
        if not self.dist.main:
            return
        (self.unavailable if status == "unavailable" else self.errors).append(
            (model, f"{section}{'/' + detail if detail else ''}", reason))
        if status == "unavailable":
            with self._unit(unit, 0.0) as tx:
                tx.add_section(model, section, status, reason, detail)
        else:
            assert self.store is not None
            self.store.add_section(self.run_id, model, section, status, reason, detail)

    # the run ------------------------------------------------------------------------------

    def run(self) -> None:
        s = self.suite
        x, y = data.load(s.dataset, s.split, n=s.n, **s.data_options)
        x, y = x.to(self.device), y.to(self.device)
        bar = tqdm(s.models, desc=f"suite {s.name}", disable=not self.progress, unit="model")
        for spec in bar:
            bar.set_postfix(model=spec.key)
            self._model(spec, x, y)
        bar.close()

    def _units_of(self, spec: ModelSpec) -> list[str]:
        s, key = self.suite, spec.key
        units = []
        for norm, eps in s.threat_list():
            units.append(unit_key("attack", key, threat_key(norm, eps)))
            if s.masking.enabled:
                units.append(unit_key("masking", key, threat_key(norm, eps)))
        if s.explain.enabled:
            units.append(unit_key("explain", key))
        if self._wants_backdoor(spec):
            units.append(unit_key("backdoor", key))
        if s.curves.enabled:
            units += [unit_key("curve", key, norm) for norm in self._curve_norms()]
        if s.certify.enabled:
            units += [unit_key("certify", key, threat_key(norm, eps))
                      for norm, eps in s.threat_list()]
        return units

    def _curve_norms(self) -> list[str]:
        return list(dict.fromkeys(norm for norm, _ in self.suite.threat_list()))

    def _wants_backdoor(self, spec: ModelSpec) -> bool:
        b = self.suite.backdoor
        if not b.enabled:
            return False
        if b.models:
            return spec.key in b.models

        return (not spec.is_user and spec.name in zoo.list()
                and zoo.get(spec.name).recipe == "backdoor")

    def _model(self, spec: ModelSpec, x: Tensor, y: Tensor) -> None:
        key = spec.key
        if unit_key("model", key) in self.done:
            self.summary_skip += 1
            return
        units = self._units_of(spec)
        if all(u in self.done for u in units):
            self.summary_skip += len(units)
            return
        try:
            loaded = _load_model(spec, self.device, self.progress)
            if self.suite.channels_last:
                loaded.model = _channels_last(loaded.model)
            k = min(int(x.shape[0]), self.suite.batch_size)
            probe_model(loaded.model, x[:k].clone(), y[:k], key)
        except SectionUnavailable as err:
            self._section(unit_key("model", key), key, "model", "unavailable", str(err))
            return
        except Exception as err:  # one broken model never stops a run
            log.warning("model %s cannot be evaluated: %s", key, err)
            self._section(unit_key("model", key), key, "model", "error", _message(err))
            return
        if self.dist.main and self.store is not None:
            self.store.clear_section(self.run_id, key, "model", "")
        s = self.suite
        main = self.dist.main
        for norm, eps in s.threat_list():
            threat = Threat(norm, eps)
            tk = threat_key(norm, eps)
            if not self._is_done(unit_key("attack", key, tk)):
                self._attack_cell(spec, loaded, threat, x, y)
            if s.masking.enabled and main and not self._is_done(unit_key("masking", key, tk)):
                self._masking(spec, loaded, threat, x, y)
            if s.certify.enabled and main and not self._is_done(unit_key("certify", key, tk)):
                self._certify(spec, loaded, threat, x, y)
        if s.curves.enabled and self.dist.main:
            for norm in self._curve_norms():
                if not self._is_done(unit_key("curve", key, norm)):
                    self._curve(spec, loaded, norm, x, y)
        if s.explain.enabled and self.dist.main and not self._is_done(unit_key("explain", key)):
            self._explain(spec, loaded, x, y)
        if (self._wants_backdoor(spec) and self.dist.main
                and not self._is_done(unit_key("backdoor", key))):
            self._backdoor(spec, loaded, x, y)

    def _attack_cell(self, spec: ModelSpec, loaded: _Loaded, threat: Threat, x: Tensor,
                     y: Tensor) -> None:
        s = self.suite
        start = time.perf_counter()
        unit = unit_key("attack", spec.key, threat_key(threat.norm, threat.eps))
        try:
            ensemble = s.build_attacks(threat.norm.value, threat.eps)
        except Exception as err:  # identical on every rank: no collective is skipped
            self._section(unit, spec.key, "attack", "error", _message(err), str(threat))
            return
        desc = f"{spec.key} {threat}"
        parts = evaluate_cell(ensemble, loaded.model, x, y, seed=s.seed,
                              batch_size=s.batch_size, rank=self.dist.rank,
                              world=self.dist.world, progress=self.progress, desc=desc)
        gathered = self.dist.gather(parts)
        if not self.dist.main:
            return
        all_parts = [p for rank_parts in gathered for p in rank_parts]
        failed = sorted((p for p in all_parts if isinstance(p, BatchFailure)), key=lambda p: p.b)
        if failed:
            message = f"{failed[0].error} (in batch {failed[0].b})"
            log.warning("attacks on %s at %s failed: %s", spec.key, threat, message)
            self._section(unit, spec.key, "attack", "error", message, str(threat))
            return
        try:
            cells, samples = merge_cell(all_parts, ensemble.labels, y, model=spec.key,
                                        norm=threat.norm.value, eps=threat.eps,
                                        sha256=loaded.sha256, source=loaded.source)
            with self._unit(unit, time.perf_counter() - start,
                            clears=(spec.key, "attack", str(threat))) as tx:
                tx.add_cells(cells)
                tx.add_samples(samples)
        except Exception as err:  # the rows of this cell are rolled back, nothing else
            log.warning("attacks on %s at %s failed: %s", spec.key, threat, err)
            self._section(unit, spec.key, "attack", "error", _message(err), str(threat))

    def _curve(self, spec: ModelSpec, loaded: _Loaded, norm: str, x: Tensor, y: Tensor
               ) -> None:
        """The security-curve search of one model and norm (:mod:`unmask.bench.suite.curves`), on
        the suite's samples, bracketed by the cascade's per-sample rows (rank 0)."""

        assert self.store is not None
        c, key = self.suite.curves, spec.key
        unit = unit_key("curve", key, norm)
        eps_list = [e for nm, e in self.suite.threat_list() if nm == norm]
        masking = {(m["norm"], float(m["eps"])): m["verdict"]
                   for m in self.store.rows("masking", self.run_id) if m["model"] == key}
        verdicts = {e: masking.get((norm, float(e))) for e in eps_list}
        selected, why, final = curves.curve_selection(c.models, key, verdicts)
        if not selected:
            log.info("no security curve for %s (%s): %s", key, norm, why)
            if final:  # the selection cannot change on resume: the unit is finished
                with self._unit(unit, 0.0):
                    pass
            return
        cascade = [r for r in self.store.rows("samples", self.run_id)
                   if r["model"] == key and r["norm"] == norm]
        if {float(r["eps"]) for r in cascade} != {float(e) for e in eps_list}:
            log.info("no security curve for %s (%s): its attack cells did not finish", key, norm)
            return  # the failed cell is the row's error; a resumed run comes back here
        start = time.perf_counter()
        try:
            grid = curves.curve_grid(eps_list, points=c.points, explicit=c.eps.get(norm))
            res = curves.search_for_suite(
                loaded.model, x, y, norm=norm, grid=grid, attacks=c.attacks, cascade=cascade,
                seed=self.suite.seed, batch_size=self.suite.batch_size,
                draws=self.suite.attacks.draws, precision=self.suite.attacks.precision,
                label=key)
        except Exception as err:
            log.warning("security curve of %s (%s) failed: %s", key, norm, err)
            self._section(unit, key, "curve", "error", _message(err), norm)
            return
        seconds = time.perf_counter() - start
        with self._unit(unit, seconds, clears=(key, "curve", norm)) as tx:
            tx.add_curve({"model": key, "norm": norm, "grid": res.grid,
                          "broken_at": res.broken_at, "n": res.n, "attacks": list(c.attacks),
                          "forwards": res.forwards, "backwards": res.backwards,
                          "wall_seconds": seconds})
    def _row_broken(self, key: str, threat: Threat, n: int) -> list[str | None] | None:
        """Per sample (first ``n``), who broke it in this run's row: the ensemble's samples
        merged with the masking diagnosis's outcomes; None when the attack cell has no rows."""

        assert self.store is not None
        norm, eps = threat.norm.value, threat.eps
        rows = sorted((r for r in self.store.rows("samples", self.run_id)
                       if r["model"] == key and r["norm"] == norm and r["eps"] == eps),
                      key=lambda r: r["sample"])
        if len(rows) < n:
            return None
        merged = SampleOutcomes(tuple(None if r["robust"] else (r["broken_by"] or "ensemble")
                                      for r in rows[:n]))
        m_row = next((r for r in self.store.rows("masking", self.run_id)
                      if r["model"] == key and r["norm"] == norm and r["eps"] == eps), None)
        outcomes = stored_outcomes(m_row)
        if outcomes is not None:
            k = min(outcomes.n, n)
            head = SampleOutcomes(merged.broken_by[:k]).merge(
                SampleOutcomes(tuple(outcomes.broken_by[:k])))
            merged = SampleOutcomes(head.broken_by + merged.broken_by[k:])
        return list(merged.broken_by)

    def _certify(self, spec: ModelSpec, loaded: _Loaded, threat: Threat, x: Tensor,
                 y: Tensor) -> None:
        c = self.suite.certify
        tk = threat_key(threat.norm, threat.eps)
        unit = unit_key("certify", spec.key, tk)
        n = min(c.n or int(x.shape[0]), int(x.shape[0]))
        start = time.perf_counter()
        try:
            results = certify_methods(loaded.model, x[:n].clone(), y[:n].clone(), threat,
                                      methods=c.methods, time_limit=c.time_limit)
        except Exception as err:
            log.warning("certification of %s at %s failed: %s", spec.key, threat, err)
            self._section(unit, spec.key, "certify", "error", _message(err), str(threat))
            return
        broken = self._row_broken(spec.key, threat, n)
        common = {"model": spec.key, "norm": threat.norm.value, "eps": threat.eps, "n": n}
        rows, samples = [], []
        for r in results:
            res = r.result
            if res is None:  # not supported / unavailable: the row says why
                rows.append({**common, "method": r.method, "status": r.status,
                             "reason": r.reason, "seconds": 0.0})
                if r.status == "unavailable":
                    self.unavailable.append((spec.key, f"certify/{r.method}", r.reason))
                continue
            if broken is not None:  # the soundness stop
                try:
                    assert_sound(res, [who is not None for who in broken])
                except SoundnessError as err:
                    who = next(w for ok, w in zip(res.certified, broken) if ok and w is not None)
                    message = (f"{spec.key} at {threat}: {err} (broken by {who}); the bounds "
                               "or the attack are wrong, so the run stops")
                    self._section(unit, spec.key, "certify", "error", message, str(threat))
                    raise CertifiedSoundnessError(message) from err
            counts = {s: res.status.count(s) for s in ("certified", "broken", "unknown")}
            rows.append({**common, "method": res.method, "status": "ok", "reason": "",
                         **counts, "certified_accuracy": res.certified_accuracy,
                         "seconds": res.seconds})
            advs = res.x_adv or [None] * res.n
            samples += [{**common, "method": res.method, "sample": i, "status": st,
                         "lower": low, "counterexample": int(adv is not None)}
                        for i, (st, low, adv) in enumerate(zip(res.status, res.lower, advs))]
        seconds = time.perf_counter() - start
        with self._unit(unit, seconds, clears=(spec.key, "certify", str(threat))) as tx:
            tx.add_certified(rows, samples)

    def _surrogate_model(self) -> tuple[str | None, nn.Module | None, str]:
        """The transfer check's surrogate, loaded once per run: ``(name, model, why)``;
        ``model`` None with the reason when there is none."""
        if self._surrogate is None:

            wanted = self.suite.masking.surrogate
            if wanted == SURROGATE_NONE:
                self._surrogate = (None, None, "surrogate = 'none' in the suite's [masking]")
            else:
                name = (default_surrogate(self.suite.dataset) if wanted == SURROGATE_AUTO
                        else wanted)
                if name is None:
                    self._surrogate = (None, None, "the zoo has no standard-trained model of "
                                       f"{self.suite.dataset!r} to use as surrogate")
                else:
                    try:
                        model = zoo.load(name, device=self.device, progress=self.progress)
                        self._surrogate = (name, model.eval(), "")
                        self._surrogate_sha = _state_sha256(model)
                    except Exception as err:
                        self._surrogate = (name, None, f"surrogate {name!r} could not be "
                                           f"loaded: {_message(err)}")
        return self._surrogate

    def _masking(self, spec: ModelSpec, loaded: _Loaded, threat: Threat, x: Tensor,
                 y: Tensor) -> None:
        m = self.suite.masking
        unit = unit_key("masking", spec.key, threat_key(threat.norm, threat.eps))
        n = min(m.n, int(x.shape[0]))
        name, surrogate, why = self._surrogate_model()
        is_self = surrogate is not None and (spec.name == name or (
            loaded.sha256 is not None and loaded.sha256 == self._surrogate_sha))
        start = time.perf_counter()
        try:
            # Copies: a section must never be able to change the samples of the next one.
            report = diagnose(loaded.model, x[:n].clone(), y[:n].clone(), threat,
                              follow_up=m.follow_up, fast=m.fast,
                              generator=make_generator(self.suite.seed),
                              surrogate=None if is_self else surrogate)
            report = note_surrogate(report, name, used=surrogate is not None and not is_self,
                                    is_self=is_self, why=why)
            row = masking_row(report)
        except Exception as err:
            log.warning("masking diagnosis of %s at %s failed: %s", spec.key, threat, err)
            self._section(unit, spec.key, "masking", "error", _message(err), str(threat))
            return
        seconds = time.perf_counter() - start
        with self._unit(unit, seconds, clears=(spec.key, "masking", str(threat))) as tx:
            tx.add_masking({**row, "model": spec.key, "norm": threat.norm.value,
                            "eps": threat.eps, "n": n, "wall_seconds": seconds})

    def _explain(self, spec: ModelSpec, loaded: _Loaded, x: Tensor, y: Tensor) -> None:
        e = self.suite.explain
        unit = unit_key("explain", spec.key)
        n = min(e.n, int(x.shape[0]))
        threats = self.suite.threat_list()
        threat = Threat(*max(threats, key=lambda t: t[1])) if threats else None
        backdoor = None
        if "trigger_localisation" in e.metrics and loaded.entry is not None \
                and loaded.entry.recipe == "backdoor":
            backdoor = backdoor_of(loaded.entry)
        start = time.perf_counter()
        try:
            records, maps, problems = explain_model(
                loaded.model, x[:n].clone(), y[:n].clone(), methods=e.methods,
                metrics=e.metrics,
                ig_steps=e.ig_steps, maps=e.maps, seed=self.suite.seed, threat=threat,
                backdoor=backdoor)
        except Exception as err:
            log.warning("explanations of %s failed: %s", spec.key, err)
            self._section(unit, spec.key, "explain", "error", _message(err))
            return
        seconds = time.perf_counter() - start
        with self._unit(unit, seconds, clears=(spec.key, "explain", "")) as tx:
            tx.add_explanations([{**r.row(), "model": spec.key} for r in records])
            for mrow in maps:
                tx.add_explanation_map(spec.key, mrow.method, mrow.inputs, mrow.maps)
            for what, status, reason in problems:
                tx.add_section(spec.key, "explain", status, reason, what)
                (self.unavailable if status == "unavailable" else self.errors).append(
                    (spec.key, f"explain/{what}", reason))

    def _backdoor(self, spec: ModelSpec, loaded: _Loaded, x: Tensor, y: Tensor) -> None:
        unit = unit_key("backdoor", spec.key)
        start = time.perf_counter()
        try:
            metrics = backdoor_metrics(
                loaded.model, loaded.entry, x.clone(), y.clone(), device=self.device,
                defenses=self.suite.backdoor.defenses, seed=self.suite.seed)
        except SectionUnavailable as err:
            self._section(unit, spec.key, "backdoor", "unavailable", str(err))
            return
        except Exception as err:
            log.warning("backdoor metrics of %s failed: %s", spec.key, err)
            self._section(unit, spec.key, "backdoor", "error", f"{type(err).__name__}: {err}")
            return
        with self._unit(unit, time.perf_counter() - start,
                        clears=(spec.key, "backdoor", "")) as tx:
            tx.add_backdoor(spec.key, metrics.metrics())


def _once_per_run(category: type[Warning]) -> None:
    """Show each ``category`` warning text once (inside a ``catch_warnings`` block, which
    restores the hook): a suite runs known controls (mnist-cnn-probs) through every section,
    and the "once" filter action dedupes only per calling module."""
    seen: set[str] = set()
    show = warnings.showwarning

    def once(message, cat, *args, **kwargs):
        if issubclass(cat, category):
            if str(message) in seen:
                return
            seen.add(str(message))
        show(message, cat, *args, **kwargs)

    warnings.showwarning = once


def _resumed_suite(stored: dict[str, Any], quick: bool, suite: Suite | None,
                   skip: tuple[str, ...]) -> tuple[Suite, set[str]]:
    """The suite a resumed run continues with, and the model keys whose finished units no
    longer hold (replaced under the same key by an edited suite).

    ``suite`` (an edited suite) may change only the models: everything that decides the
    numbers of the cells already stored must be equal. ``skip`` drops models by key.
    """

    old = dataclasses.replace(parse_suite(stored, check_zoo=False), is_quick=quick)
    new = old if suite is None else suite
    if suite is not None:
        a, b = old.to_dict(), suite.to_dict()
        changed = sorted(k for k in set(a) | set(b) if k != "models" and a.get(k) != b.get(k))
        if changed or suite.is_quick != quick:
            what = ", ".join(changed) or "quick"
            raise ValueError(f"the edited suite changes {what}; resuming keeps the stored cells, "
                             "so only the models may change (start a new run instead)")
    keys = [m.key for m in new.models]
    unknown = [k for k in skip if k not in keys]
    if unknown:
        raise ValueError(f"--skip {', '.join(unknown)}: not a model of the run; its models: "
                         f"{', '.join(keys)}")
    models = tuple(m for m in new.models if m.key not in skip)
    if not models:
        raise ValueError("--skip drops every model of the run; nothing would be left")
    before = {m.key: m for m in old.models}
    replaced = {m.key for m in models if m.key in before and before[m.key] != m}
    return dataclasses.replace(new, models=models), replaced


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped run ``run_id``; its finished units are in ``store``."""

    def __init__(self, run_id: int, store: Path) -> None:
        super().__init__(f"run {run_id} interrupted")
        self.run_id, self.store = run_id, store


def run_suite(suite: Suite | None = None, *, store: str | os.PathLike | None = None,
              resume: int | None = None, device: str | torch.device | None = None,
              progress: bool = True, skip: tuple[str, ...] | list[str] = ()) -> RunSummary:
    """Run ``suite`` (or resume run ``resume`` of the store) and write it into the store.

    Resuming skips the finished units and runs again what failed (an ``error`` section).
    With ``resume``, ``suite`` is an edited version of the stored suite (only its models may
    differ: a model replaced under the same key is run again, a new one is added) and
    ``skip`` drops models by key (their stored rows stay in the store, out of the table).

    Returns the :class:`RunSummary` (on every rank; only rank 0's store writes happened).
    """

    if suite is None and resume is None:
        raise ValueError("give a suite, or a run to resume")
    skip = tuple(skip)
    if skip and resume is None:
        raise ValueError("skip drops models from a resumed run; edit the suite instead")
    wanted = device if device is not None else (suite.device if suite is not None else None)
    dev = select_device(wanted)
    dist = _Dist(dev)
    dev = dist.device or dev
    path = default_path(store)
    if resume is not None and not Path(path).exists():

        raise StoreError(f"no results store at {path}: there is no run {resume} to resume "
                         "(--store PATH names the store the run wrote to)")
    st: Store | None = None
    started = time.perf_counter()
    status = "failed"
    ok = False
    try:
        if dist.main:
            st = Store(path)
            if resume is not None:
                stored = st.run(resume)
                resumed, replaced = _resumed_suite(stored.config, stored.quick, suite, skip)
                run = st.reopen_run(resume, device=str(dev), world_size=dist.world)
                config, quick, run_id = resumed.to_dict(), run.quick, run.run_id
                if config != run.config:
                    st.update_run_config(run_id, config, resumed.config_hash())
                done = {u for u in st.finished_units(resume)
                        if not any(u.endswith(f"/{k}") or f"/{k}/" in u for k in replaced)}
            else:
                assert suite is not None
                config, quick = suite.to_dict(), suite.is_quick
                run_id = st.start_run(suite=suite.name, config=config,
                                      config_hash=suite.config_hash(), seed=suite.seed,
                                      quick=quick, git_commit=git_commit(),
                                      versions=versions(), device=str(dev),
                                      world_size=dist.world, host=platform.node())
                done = set()
            shared = (run_id, config, quick, sorted(done))
        else:
            shared = None
        run_id, config, quick, done_list = dist.broadcast(shared)
        if resume is not None or not dist.main:

            suite = dataclasses.replace(parse_suite(config, check_zoo=False), is_quick=quick)
        assert suite is not None
        runner = _Runner(suite, st, run_id, set(done_list), dist, dev, progress)
        try:
            with warnings.catch_warnings():
                _once_per_run(ProbabilityOutputWarning)
                runner.run()
            status = "finished"
        except KeyboardInterrupt as err:
            status = "interrupted"
            raise RunInterrupted(run_id, path) from err
        finally:
            if st is not None:
                st.set_status(run_id, status)
        ok = True
        return RunSummary(run_id=run_id, store=path, status=status,
                          wall_seconds=time.perf_counter() - started,
                          units_run=runner.summary_run, units_skipped=runner.summary_skip,
                          unavailable=runner.unavailable, errors=runner.errors)
    finally:
        if st is not None:
            st.close()
        dist.close(ok)
