"""The masking benchmark from the literature: published inference-time defenses that were later
shown to mask gradients (the positives), honest models that do not (the negatives), and for
each a reference adaptive attack written with the defense's known structure.

For every entry :func:`run_benchmark` loads the zoo model, runs
``diagnose(model, x, y, threat, follow_up=True, surrogate=mnist-cnn)`` and the entry's
reference attack on the same samples, and records: the verdict, the failed checks, the
diagnosis's merged robust accuracy (per-sample worst case over its own attacks and the
follow-up), the follow-up's figure and attacks, the reference attack's robust accuracy
(per-sample worst case of the reference attack and plain PGD-40), and the follow-up's gap to
the reference in points. The properties it checks (:attr:`BenchmarkRow.properties`):

* a positive is never "clean"; a negative is never "masked";
* the follow-up comes within :data:`GAP_TOLERANCE` of the reference:
  ``follow_up_after <= reference_robust_accuracy + 0.05``.

Sources of the positives: Athalye, Carlini & Wagner, ICML 2018 ("Obfuscated Gradients Give a
False Sense of Security"); Tramer, Carlini, Brendel & Madry, NeurIPS 2020 ("On Adaptive
Attacks to Adversarial Example Defenses"); Croce et al., ICML 2022 ("Evaluating the
Adversarial Robustness of Adaptive Test-time Defenses"). The wrappers are in
:mod:`unmask.defenses.inference` and :mod:`unmask.defenses.literature`.

Randomised models are judged with the one definition of :mod:`unmask.bench.core`: a sample is
robust when the model classifies the attack's point correctly on a strict majority of
``DRAWS`` fresh draws.

One command regenerates the table in ``docs/masking.md``::

    UNMASK_CACHE=/work/cache/zoo python -m unmask.bench.perf.masking_benchmark --n 100 \\
        --write docs/masking.md
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...attacks import APGD, BPDA, EOT, PGD, Attack, success_rate
from ...attacks.losses import margin_loss
from ...defenses.masking import diagnose
from .. import data, zoo
from ..core import DRAWS, Threat, check_inputs, make_generator, model_mode, robust_by_majority
from ..core.fileio import atomic_write, write_between_markers

__all__ = ["BenchmarkEntry", "BenchmarkRow", "ENTRIES", "GAP_TOLERANCE", "MARKERS",
           "reference_broken", "plain_pgd_broken", "run_entry", "run_benchmark",
           "markdown_table", "write_table", "main"]

log = logging.getLogger(__name__)

#: The follow-up must come within this many (fractional) points of the reference attack.
GAP_TOLERANCE = 0.05
#: The markers in ``docs/masking.md`` between which :func:`write_table` writes.
MARKERS = ("<!-- masking-benchmark:start -->", "<!-- masking-benchmark:end -->")
#: Steps of the reference attacks (strong enough to converge on these models, measured: the
#: reference robust accuracy of every positive moves by at most a few samples from 100 to 200
#: steps) and of the plain PGD they are combined with.
REFERENCE_STEPS = 100
EOT_REFERENCE_STEPS = 50
EOT_REFERENCE_SAMPLES = 16
PLAIN_PGD_STEPS = 40
SURROGATE = "mnist-cnn"


def _log_prob_margin(probs: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    # The model returns probabilities: attack the logit margin of log p (= the logits up to a
    # per-sample constant), which the softmax cannot flatten.
    return margin_loss(probs.clamp_min(1e-30).log(), y, targets)


@dataclass(frozen=True)
class BenchmarkEntry:
    """One model of the benchmark.

    Attributes:
        name: zoo name.
        paper: the defense's paper ("standard training" for the plain model).
        broken_by: the paper that showed it masks (empty for a negative).
        mechanism: how it masks, and the adaptive attack that undoes it.
        masks: True for a positive (published, later shown to mask), False for a negative.
        randomised: the model draws fresh randomness at every forward pass.
        reference: ``threat -> Attack``: the adaptive attack written with the defense's
            known structure.
        reference_label: a short name of the reference attack for the table.
    """

    name: str
    paper: str
    broken_by: str
    mechanism: str
    masks: bool
    randomised: bool
    reference: Callable[[Threat], Attack]
    reference_label: str

    def to_dict(self) -> dict[str, Any]:
        """The entry as a JSON-ready dict (the reference attack's builder left out)."""
        return {k: v for k, v in asdict(self).items() if k != "reference"}


def _bpda_pgd(loss: str = "ce") -> Callable[[Threat], Attack]:
    return lambda t: BPDA(PGD(t, steps=REFERENCE_STEPS, loss=loss))


def _eot_pgd() -> Callable[[Threat], Attack]:
    return lambda t: EOT(PGD(t, steps=EOT_REFERENCE_STEPS), samples=EOT_REFERENCE_SAMPLES,
                         eval_draws=DRAWS)


ENTRIES: tuple[BenchmarkEntry, ...] = (
    # Positives, the five masking controls of defense_zoo first.
    BenchmarkEntry("mnist-cnn-quantized", "Xu, Evans & Qi, NDSS 2018 (bit-depth reduction)",
                   "Athalye et al. 2018", "shattered: rounding, zero gradient; BPDA identity",
                   True, False, _bpda_pgd(), f"BPDA-PGD-{REFERENCE_STEPS}"),
    BenchmarkEntry("mnist-cnn-jpeg", "Guo et al., ICLR 2018 (JPEG)", "Athalye et al. 2018",
                   "shattered: JPEG codec, zero gradient; BPDA identity",
                   True, False, _bpda_pgd(), f"BPDA-PGD-{REFERENCE_STEPS}"),
    BenchmarkEntry("mnist-cnn-lowtemp", "defensive distillation's test-time temperature "
                   "(Papernot et al., S&P 2016)", "Carlini & Wagner 2016",
                   "vanishing: softmax saturates, CE gradient underflows; margin loss",
                   True, False, lambda t: PGD(t, steps=REFERENCE_STEPS, loss="margin"),
                   f"PGD-{REFERENCE_STEPS}-margin"),
    BenchmarkEntry("mnist-cnn-noise", "Gaussian input noise (one noisy prediction per query)",
                   "Athalye et al. 2018", "stochastic: fresh noise per pass; EOT",
                   True, True, _eot_pgd(),
                   f"EOT{EOT_REFERENCE_SAMPLES}-PGD-{EOT_REFERENCE_STEPS}"),
    BenchmarkEntry("mnist-cnn-probs", "probability outputs (Carlini & Wagner, S&P 2017)",
                   "Carlini & Wagner 2017", "vanishing: CE on probabilities; margin of "
                   "log-probabilities", True, False,
                   lambda t: PGD(t, steps=REFERENCE_STEPS, loss="margin",
                                 loss_fn=_log_prob_margin),
                   f"PGD-{REFERENCE_STEPS}-margin(log p)"),
    # Positives of defenses/literature.py.
    BenchmarkEntry("mnist-cnn-thermometer", "Buckman et al., ICLR 2018 (thermometer encoding)",
                   "Athalye et al. 2018", "shattered: step-function code; BPDA with the soft "
                   "thermometer", True, False, _bpda_pgd("margin"),
                   f"BPDA-PGD-{REFERENCE_STEPS}-margin"),
    BenchmarkEntry("mnist-cnn-resizepad", "Xie et al., ICLR 2018 (random resizing and "
                   "padding)", "Athalye et al. 2018", "stochastic: random rescaling and "
                   "placement; EOT", True, True, _eot_pgd(),
                   f"EOT{EOT_REFERENCE_SAMPLES}-PGD-{EOT_REFERENCE_STEPS}"),
    BenchmarkEntry("mnist-cnn-sap", "Dhillon et al., ICLR 2018 (stochastic activation "
                   "pruning)", "Athalye et al. 2018", "stochastic: random pruning of "
                   "activations; EOT", True, True, _eot_pgd(),
                   f"EOT{EOT_REFERENCE_SAMPLES}-PGD-{EOT_REFERENCE_STEPS}"),
    BenchmarkEntry("mnist-cnn-kwta", "Xiao et al., ICLR 2020 (k-winners-take-all)",
                   "Tramer et al. 2020", "discontinuous activations; BPDA with ReLU",
                   True, False, _bpda_pgd(), f"BPDA(ReLU)-PGD-{REFERENCE_STEPS}"),
    BenchmarkEntry("mnist-cnn-purifier", "PixelDefend / Defense-GAN-style purification "
                   "(Song et al., Samangouei et al., ICLR 2018)", "Athalye et al. 2018",
                   "shattered: gradient descent on the input inside forward; BPDA identity "
                   "(attacks the underlying model)", True, False, _bpda_pgd("margin"),
                   f"BPDA-PGD-{REFERENCE_STEPS}-margin"),
    BenchmarkEntry("mnist-cnn-tvm", "Guo et al., ICLR 2018 (total variation minimisation)",
                   "Athalye et al. 2018", "shattered: a solver inside forward; BPDA identity",
                   True, False, _bpda_pgd(), f"BPDA-PGD-{REFERENCE_STEPS}"),
    BenchmarkEntry("mnist-cnn-detector", "Xu, Evans & Qi, NDSS 2018 (feature-squeezing "
                   "detection)", "He et al. 2017; Tramer et al. 2020", "rejection answered "
                   "with saturated, gradient-free logits; BPDA through the gate, margin loss",
                   True, False, _bpda_pgd("margin"), f"BPDA-PGD-{REFERENCE_STEPS}-margin"),
    # Honest negatives.
    BenchmarkEntry("mnist-cnn", "standard training", "", "none", False, False,
                   lambda t: APGD(t, steps=REFERENCE_STEPS, loss="dlr"),
                   f"APGD-{REFERENCE_STEPS}-DLR"),
    BenchmarkEntry("mnist-cnn-pgdat", "Madry et al., ICLR 2018 (PGD-AT)", "", "none", False,
                   False, lambda t: APGD(t, steps=REFERENCE_STEPS, loss="dlr"),
                   f"APGD-{REFERENCE_STEPS}-DLR"),
    BenchmarkEntry("mnist-cnn-trades", "Zhang et al., ICML 2019 (TRADES)", "", "none", False,
                   False, lambda t: APGD(t, steps=REFERENCE_STEPS, loss="dlr"),
                   f"APGD-{REFERENCE_STEPS}-DLR"),
)


def _broken(model: nn.Module, x_adv: Tensor, y: Tensor, result, randomised: bool,
            generator: torch.Generator) -> Tensor:
    """Bool ``N``: the attack's point is misclassified (randomised: on most fresh draws)."""
    if not randomised:
        return result.success.clone()
    rate = result.expected_success
    if rate is None:
        rate = success_rate(model, x_adv, y, draws=DRAWS, generator=generator)
    return ~robust_by_majority(rate)


def plain_pgd_broken(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
                     randomised: bool, generator: torch.Generator | int | None = 0) -> Tensor:
    """Bool ``N``: samples plain PGD-40 (CE) breaks, judged as :func:`reference_broken` is."""
    x, y = check_inputs(x, y)
    g = make_generator(0 if generator is None else generator)
    r = PGD(threat, steps=PLAIN_PGD_STEPS)(model, x, y, generator=g)
    return _broken(model, r.x_adv, y, r, randomised, g)


def reference_broken(model: nn.Module, x: Tensor, y: Tensor, threat: Threat,
                     entry: BenchmarkEntry, *,
                     generator: torch.Generator | int | None = 0) -> Tensor:
    """Bool ``N``: samples the entry's reference attack breaks (clean errors included).

    A randomised model's sample is broken when the attack's point fools it on a majority of
    ``DRAWS`` fresh draws (EOT measures this itself). Usage:
    ``reference_broken(model, x, y, Threat("linf", 0.3), ENTRIES[0]).float().mean()``.
    """
    if not isinstance(entry, BenchmarkEntry):
        raise TypeError(f"entry must be a BenchmarkEntry, got {type(entry).__name__}")
    x, y = check_inputs(x, y)
    g = make_generator(0 if generator is None else generator)
    r = entry.reference(threat)(model, x, y, generator=g)
    return _broken(model, r.x_adv, y, r, entry.randomised, g)


@dataclass
class BenchmarkRow:
    """One row of the benchmark table (``to_dict`` for JSON).

    ``robust_accuracy``: the diagnosis's merged number (``report.outcomes.robust_accuracy``);
    ``follow_up_after``: the follow-up's robust accuracy (None when it did not run);
    ``reference_robust_accuracy``: per-sample worst case of the reference attack and plain
    PGD-40; ``gap``: ``follow_up_after - reference_robust_accuracy`` (fraction; x 100 for
    points); ``plain_pgd_robust_accuracy``: plain PGD-40 alone, the number masking inflates.
    """

    name: str
    paper: str
    mechanism: str
    masks: bool
    verdict: str
    failed_checks: list[str]
    robust_accuracy: float
    follow_up_attack: str | None
    follow_up_after: float | None
    reference_attack: str
    reference_robust_accuracy: float
    plain_pgd_robust_accuracy: float
    n: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """The follow-up's robust accuracy minus the reference attack's (None without a
        follow-up): how far the adaptive attack stayed above the known answer.
        """
        if self.follow_up_after is None:
            return None
        return self.follow_up_after - self.reference_robust_accuracy

    @property
    def properties(self) -> dict[str, bool]:
        """The benchmark's claims on this row: verdict side and follow-up gap."""
        if self.verdict.startswith("error"):
            return {"verdict": False, "follow_up_within_tolerance": False}
        out = {"verdict": (self.verdict != "clean") if self.masks else (self.verdict != "masked")}
        gap = self.gap
        out["follow_up_within_tolerance"] = gap is not None and gap <= GAP_TOLERANCE + 1e-9
        return out

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict, with ``gap`` and ``properties``."""
        d = asdict(self)
        d.update(gap=self.gap, properties=self.properties)
        return d


def run_entry(entry: BenchmarkEntry, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
              surrogate: nn.Module | None, fast: bool = True,
              generator: int = 0) -> BenchmarkRow:
    """Diagnose ``model`` and run ``entry``'s reference attack on the same samples."""

    x, y = check_inputs(x, y)
    start = time.perf_counter()
    report = diagnose(model, x, y, threat, follow_up=True, fast=fast, generator=generator,
                      surrogate=surrogate)
    plain = plain_pgd_broken(model, x, y, threat, randomised=entry.randomised,
                             generator=generator)
    ref = reference_broken(model, x, y, threat, entry, generator=generator) | plain
    fu = report.follow_up or {}
    n = x.shape[0]
    return BenchmarkRow(
        name=entry.name, paper=entry.paper, mechanism=entry.mechanism, masks=entry.masks,
        verdict=report.verdict.value, failed_checks=[c.name for c in report.failed],
        robust_accuracy=float(report.outcomes.robust_accuracy),
        follow_up_attack=fu.get("attack"), follow_up_after=fu.get("after"),
        reference_attack=entry.reference_label,
        reference_robust_accuracy=float((~ref).sum()) / n,
        plain_pgd_robust_accuracy=float((~plain).sum()) / n, n=n,
        seconds=time.perf_counter() - start,
        extra={"follow_up_broken_by": fu.get("broken_by"), "fast": fast})


def run_benchmark(n: int = 100, *, fast: bool = True, threat: Threat | None = None,
                  entries: Sequence[BenchmarkEntry] = ENTRIES, seed: int = 0,
                  device: str = "cpu", done: Sequence[BenchmarkRow] = (),
                  on_row: Callable[[list[BenchmarkRow]], None] | None = None
                  ) -> list[BenchmarkRow]:
    """Run every entry on the first ``n`` test images of mnist5k (zoo models from
    ``UNMASK_CACHE``; missing ones are trained). Threat default Linf 0.3.

    ``done``: rows of an interrupted run (same ``n``) that are kept instead of re-run;
    ``on_row(rows)`` is called after every row (e.g. to save progress)."""

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    threat = threat if threat is not None else Threat("linf", 0.3)
    x, y = data.load("mnist5k", "test")
    x, y = x[:n].to(device), y[:n].to(device)
    surrogate = zoo.load(SURROGATE, device=device, progress=False)
    finished = {r.name: r for r in done if r.n == n}
    rows: list[BenchmarkRow] = []
    for entry in entries:
        if entry.name in finished:
            rows.append(finished[entry.name])
            continue
        model = zoo.load(entry.name, device=device, progress=False)
        log.info("masking benchmark: %s", entry.name)
        start = time.perf_counter()
        try:
            with model_mode(model):
                row = run_entry(entry, model, x, y, threat, surrogate=surrogate, fast=fast,
                                generator=seed)
        except Exception as err:  # one failing entry is recorded, the others still run
            log.exception("masking benchmark: %s failed", entry.name)
            row = BenchmarkRow(entry.name, entry.paper, entry.mechanism, entry.masks,
                               f"error: {type(err).__name__}: {err}", [], float("nan"), None,
                               None, entry.reference_label, float("nan"), float("nan"),
                               x.shape[0], time.perf_counter() - start)
        log.info("masking benchmark: %s %s merged %.2f follow-up %s reference %.2f (%.0f s)",
                 row.name, row.verdict, row.robust_accuracy, row.follow_up_after,
                 row.reference_robust_accuracy, row.seconds)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown_table(rows: Sequence[BenchmarkRow], *, threat: Threat, fast: bool,
                   seconds: float | None = None) -> str:
    """The benchmark as a markdown table, with a header line saying how it was run."""
    mode = "fast" if fast else "full"
    n = rows[0].n if rows else 0
    head = (f"Linf eps {threat.eps:g}, first {n} mnist5k test images, `diagnose(..., "
            f"follow_up=True, fast={fast}, surrogate={SURROGATE})` ({mode} mode)"
            + (f", {seconds / 60:.1f} min on CPU" if seconds is not None else "") + ".")
    lines = [head, "",
             "| model | defense (paper) | kind | verdict | failed checks | merged robust acc. "
             "| follow-up (after) | reference attack | reference robust acc. | gap (points) "
             "| plain PGD-40 | holds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = r.gap
        holds = all(r.properties.values())
        lines.append(
            f"| {r.name} | {r.paper} | {'positive' if r.masks else 'negative'} | {r.verdict} "
            f"| {', '.join(r.failed_checks) or '-'} | {_pct(r.robust_accuracy)} "
            f"| {_pct(r.follow_up_after)} ({r.follow_up_attack or '-'}) | {r.reference_attack} "
            f"| {_pct(r.reference_robust_accuracy)} "
            f"| {'-' if gap is None else f'{100 * gap:+.0f}'} "
            f"| {_pct(r.plain_pgd_robust_accuracy)} | {'yes' if holds else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_table(path: str | Path, table: str) -> None:
    """Replace the text between :data:`MARKERS` in ``path`` by ``table`` (atomically)."""
    write_between_markers(path, MARKERS, table)


def _row_from_dict(d: dict[str, Any]) -> BenchmarkRow:
    names = {f for f in BenchmarkRow.__dataclass_fields__}
    return BenchmarkRow(**{k: v for k, v in d.items() if k in names})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unmask.bench.perf.masking_benchmark [--n 100] [--full] [--write docs/masking.md]``"""
    parser = argparse.ArgumentParser(prog="python -m unmask.bench.perf.masking_benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--full", action="store_true",
                        help="the diagnosis's full budgets (default: fast mode)")
    parser.add_argument("--only", nargs="*", default=None, help="zoo names to run")
    parser.add_argument("--write", default=None, help="markdown file with the markers")
    parser.add_argument("--json", default=None,
                        help="also write the rows as JSON here (after every row)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json (an interrupted run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    entries = ENTRIES
    if args.only:
        known = {e.name: e for e in ENTRIES}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"unknown entries {unknown}; known: {', '.join(known)}")
        entries = tuple(known[n] for n in args.only)
    threat = Threat("linf", 0.3)
    done: list[BenchmarkRow] = []
    if args.resume:
        if not args.json:
            parser.error("--resume needs --json")
        if Path(args.json).exists():
            done = [_row_from_dict(d) for d in json.loads(Path(args.json).read_text())]

    def save(rows: list[BenchmarkRow]) -> None:
        if args.json:
            atomic_write(args.json, json.dumps([r.to_dict() for r in rows], indent=2).encode())

    start = time.perf_counter()
    rows = run_benchmark(args.n, fast=not args.full, threat=threat, entries=entries, done=done,
                         on_row=save)
    # The run time is the sum over rows, so a resumed run reports the whole benchmark's time.
    table = markdown_table(rows, threat=threat, fast=not args.full,
                           seconds=sum(r.seconds for r in rows))
    log.info("masking benchmark: this invocation took %.0f s", time.perf_counter() - start)
    print(table)
    if args.write:
        write_table(args.write, table)
    return 0 if all(all(r.properties.values()) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
