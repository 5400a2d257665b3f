"""unmask against the official AutoAttack, in one process, on the same model object.

    python -m unmask.bench.perf.autoattack --model mnist-cnn-pgdat --n 500 --eps 0.3 \\
        --repeats 3 --json results/perf/autoattack-mnist-cnn-pgdat.json

The official implementation is Croce and Hein's AutoAttack as packaged on the registry
(``pyautoattack``, a dev extra: ``pip install -e .[dev]``). For every method the same model
object, the same samples and the same eps are used; the model is wrapped in a
:class:`~unmask.bench.core.counting.CountingModel` on both sides, so forward and backward passes
are counted the same way (every sample row through the model, whatever the library), and
every method's returned points are judged by one function, :func:`robust_accuracy` (inside the
ball and [0, 1], classified correctly by the fp32 model).

Methods (``--methods``): ``autoattack`` (the official standard version: APGD-CE, APGD-T,
FAB-T, Square-5000, batch = n), and any unmask ensemble preset (``adaptive``, ``standard``,
...). Rounds are interleaved: each repeat runs every method once, and the model's own
forward+backward rate ``R_fb`` is measured in each round, so a slow phase of a shared machine
hits all methods alike. Wall times are medians over the repeats; the pass counts do not
depend on the round (fixed seeds) and the tool checks they agree. ``--once`` names methods
run in the first round only (their wall time is then one measurement).

``--golden`` adds the agreement check of unmask's APGD-CE and APGD-T against the official
``APGDAttack`` / ``APGDAttack_targeted`` at the same budget (100 steps, 1 restart, 9 targets).

Each method also records its strength-per-cost curve: robust accuracy after each stage
against the forward+backward passes per sample spent so far (for the official AutoAttack,
read off its per-attack log lines and the counters at that moment).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...attacks import APGD, APGDT, PRESETS, Ensemble
from .. import data, zoo
from ..core import Threat, model_mode
from ..core.counting import CountingModel
from ..core.fileio import atomic_write
from ..report.plotting import _figure, _save
from ..zoo.registry import versions
from .harness import reference_rates

__all__ = ["robust_accuracy", "MethodRun", "run_official", "run_preset", "run_golden",
           "compare", "plot_strength_per_cost", "markdown_table", "main", "OFFICIAL"]

log = logging.getLogger(__name__)

OFFICIAL = "autoattack"
_AFTER = re.compile(r"robust accuracy after ([A-Z-]+): ([0-9.]+)%")
_INITIAL = re.compile(r"initial accuracy: ([0-9.]+)%")


def _official():
    try:
        # Deferred: optional dev dependency: only this comparison and its tests need it.
        import pyautoattack
    except ImportError as err:  # pragma: no cover - the dev extra is installed in CI
        raise SystemExit("the official AutoAttack is not installed: pip install -e .[dev] "
                         "(or pip install pyautoattack)") from err
    return pyautoattack


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor,
                    threat: Threat) -> tuple[float, Tensor]:
    """The one judge of every method's returned points: a sample is robust unless its point is
    inside the threat ball and [0, 1] and the fp32 ``model`` misclassifies it (a point outside
    the ball is the attack's failure, never a break). Returns ``(accuracy, robust mask)``."""
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv has shape {tuple(x_adv.shape)}, x {tuple(x.shape)}")
    inside = threat.contains(x_adv.float(), x.float())
    with model_mode(model), torch.no_grad():
        correct = model(x_adv.float()).argmax(1) == y
    robust = correct | ~inside
    return float(robust.float().mean()), robust


@dataclass
class MethodRun:
    """One run of one method: its returned points, wall seconds, the passes the counting
    wrapper saw, and its curve ``[(passes per sample, robust accuracy), ...]`` at stage
    boundaries (the method's own per-stage accounting)."""

    method: str
    x_adv: Tensor
    seconds: float
    forwards: int
    backwards: int
    curve: list[tuple[float, float]] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)


class _LogCurve(logging.Handler):
    """Collects the official AutoAttack's per-attack robust accuracy with the counters' state
    at the moment each line is logged."""

    def __init__(self, counted: CountingModel, n: int) -> None:
        super().__init__(level=logging.DEBUG)
        self.counted, self.n = counted, n
        self.curve: list[tuple[float, float]] = []
        self.stages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        passes = (self.counted.forwards + self.counted.backwards) / self.n
        if m := _INITIAL.search(msg):
            self.curve.append((passes, float(m.group(1)) / 100))
            self.stages.append("clean")
        elif m := _AFTER.search(msg):
            self.curve.append((passes, float(m.group(2)) / 100))
            self.stages.append(m.group(1).lower())


def run_official(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
                 seed: int = 0) -> MethodRun:
    """The official AutoAttack, standard version, on ``model`` (batch = all of ``x``)."""
    aa_mod = _official()
    counted = CountingModel(model)
    norm = {"linf": "Linf", "l2": "L2"}[threat.norm.value]
    aa = aa_mod.AutoAttack(counted, norm=norm, eps=threat.eps, version="standard", seed=seed,
                           device=x.device)
    handler = _LogCurve(counted, x.shape[0])
    logger = aa.logger
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with model_mode(model):
            start = time.perf_counter()
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
            seconds = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return MethodRun(OFFICIAL, x_adv.detach(), seconds, counted.forwards, counted.backwards,
                     handler.curve, handler.stages)


def run_preset(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, preset: str, *,
               seed: int = 0) -> MethodRun:
    """An unmask ensemble preset on ``model``; its curve from the ensemble's per-attack costs,
    which must add up to what the counting wrapper saw."""
    counted = CountingModel(model)
    ensemble = Ensemble.preset(preset, threat)
    start = time.perf_counter()
    result = ensemble(counted, x, y, generator=seed)
    seconds = time.perf_counter() - start
    n = x.shape[0]
    own = sum(c.forwards + c.backwards for c in result.costs.values())
    overhead = counted.forwards + counted.backwards - own  # the clean pass and randomness test
    passes, robust = overhead, int(result.clean_correct.sum())
    curve, stages = [(passes / n, robust / n)], ["clean"]
    for label, cost in result.costs.items():
        passes += cost.forwards + cost.backwards
        robust -= cost.broken
        curve.append((passes / n, robust / n))
        stages.append(label)
    return MethodRun(preset, result.x_adv.detach(), seconds, counted.forwards, counted.backwards,
                     curve, stages)


def run_golden(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, steps: int = 100,
               n_targets: int = 9, seed: int = 0) -> dict[str, Any]:
    """unmask's APGD-CE and APGD-T against the official ``APGDAttack`` and
    ``APGDAttack_targeted`` at the same budget (``steps``, 1 restart, ``n_targets``), judged by
    :func:`robust_accuracy`. Returns per attack both robust accuracies, their difference in
    points, and each side's passes and seconds."""
    aa_mod = _official()
    # Deferred: optional dev dependency (the official attacks live in a submodule).
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    norm = {"linf": "Linf", "l2": "L2"}[threat.norm.value]
    out: dict[str, Any] = {"steps": steps, "n_targets": n_targets, "version": aa_mod.__name__}
    pairs: list[tuple[str, Callable[[nn.Module], Tensor], Callable[[nn.Module], Tensor]]] = [
        ("apgd-ce",
         lambda m: APGD(threat, steps=steps, loss="ce")(m, x, y, generator=seed).x_adv,
         lambda m: APGDAttack(m, n_iter=steps, eps=threat.eps, norm=norm, loss="ce",
                                     seed=seed, device=x.device).perturb(x, y)),
        ("apgd-t",
         lambda m: APGDT(threat, steps=steps, n_targets=n_targets)(m, x, y,
                                                                     generator=seed).x_adv,
         lambda m: APGDAttack_targeted(m, n_iter=steps, eps=threat.eps, norm=norm,
                                              seed=seed, n_target_classes=n_targets,
                                              device=x.device).perturb(x, y)),
    ]
    for name, ours, theirs in pairs:
        row: dict[str, Any] = {}
        for side, fn in (("unmask", ours), ("official", theirs)):
            counted = CountingModel(model)
            with model_mode(model):
                start = time.perf_counter()
                x_adv = fn(counted)
                seconds = time.perf_counter() - start
            acc, _ = robust_accuracy(model, x, y, x_adv.detach(), threat)
            row[side] = {"robust_accuracy": acc, "seconds": seconds,
                         "passes_per_sample": (counted.forwards + counted.backwards) / len(y)}
        row["difference_points"] = 100 * (row["unmask"]["robust_accuracy"]
                                          - row["official"]["robust_accuracy"])
        out[name] = row
        log.info("golden %s: unmask %.3f, official %.3f", name,
                 row["unmask"]["robust_accuracy"], row["official"]["robust_accuracy"])
    return out


def _summary(model: nn.Module, x: Tensor, y: Tensor, threat: Threat,
             runs: list[MethodRun]) -> dict[str, Any]:
    n = x.shape[0]
    accs = [robust_accuracy(model, x, y, r.x_adv, threat)[0] for r in runs]
    if len({(r.forwards, r.backwards) for r in runs}) > 1:
        log.warning("%s: pass counts differ between rounds: %s", runs[0].method,
                    [(r.forwards, r.backwards) for r in runs])
    last = runs[-1]
    seconds = [r.seconds for r in runs]
    return {"robust_accuracy": statistics.median(accs), "robust_accuracy_all": accs,
            "seconds": statistics.median(seconds), "seconds_all": seconds,
            "forwards": last.forwards, "backwards": last.backwards,
            "forwards_per_sample": last.forwards / n, "backwards_per_sample": last.backwards / n,
            "passes_per_sample": (last.forwards + last.backwards) / n,
            "curve": [{"stage": s, "passes_per_sample": p, "robust_accuracy": a}
                      for s, (p, a) in zip(last.stages, last.curve)]}


def compare(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
            methods: Sequence[str] = (OFFICIAL, "adaptive"), repeats: int = 3,
            once: Sequence[str] = (), seed: int = 0, golden: bool = False,
            progress: Callable[[str], None] | None = None,
            checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``methods`` interleaved over ``repeats`` rounds (``once``: first round only) and
    return the comparison as a JSON-ready dict: per method the shared-judge robust accuracy,
    median wall time, passes per sample and curve; ``R_fb`` per round; the ratios of every
    unmask method to the official AutoAttack (wall time, passes) and its robust accuracy
    difference in points; with ``golden``, :func:`run_golden`. ``checkpoint`` receives the
    results so far after every run (the command line writes them to its JSON each time)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    unknown = [m for m in methods if m != OFFICIAL and m not in PRESETS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: use {OFFICIAL!r} or a preset "
                         f"({', '.join(PRESETS.names())})")
    say = progress or (lambda msg: None)
    keep = checkpoint or (lambda partial: None)
    runs: dict[str, list[MethodRun]] = {m: [] for m in methods}
    r_fb: list[float] = []
    out: dict[str, Any] = {}
    for r in range(repeats):
        r_fb.append(reference_rates(model, x, y)[0])
        for m in methods:
            if r and m in once:
                continue
            run = (run_official(model, x, y, threat, seed=seed) if m == OFFICIAL
                   else run_preset(model, x, y, threat, m, seed=seed))
            runs[m].append(run)
            say(f"round {r + 1}/{repeats}: {m} {run.seconds:.1f} s, "
                f"{(run.forwards + run.backwards) / len(y):,.0f} passes/sample")
            out = _summaries(model, x, y, threat, runs, r_fb)
            keep(out)  # nothing measured is lost if a later round fails
    if golden:
        say("golden agreement: APGD-CE and APGD-T, unmask vs official")
        out["golden"] = run_golden(model, x, y, threat, seed=seed)
        keep(out)
    return out


def _summaries(model: nn.Module, x: Tensor, y: Tensor, threat: Threat,
               runs: dict[str, list[MethodRun]], r_fb: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"methods": {m: _summary(model, x, y, threat, rs)
                                       for m, rs in runs.items() if rs},
                           "R_fb": statistics.median(r_fb), "R_fb_all": list(r_fb)}
    if runs.get(OFFICIAL):
        ref = out["methods"][OFFICIAL]
        for m, s in out["methods"].items():
            if m == OFFICIAL:
                continue
            # Wall-time ratio per round where both ran (interleaved), then the median.
            paired = [a.seconds / b.seconds for a, b in zip(runs[m], runs[OFFICIAL])]
            s["vs_autoattack"] = {
                "seconds_ratio": statistics.median(paired), "seconds_ratio_all": paired,
                "passes_ratio": s["passes_per_sample"] / ref["passes_per_sample"],
                "robust_accuracy_points": 100 * (s["robust_accuracy"] - ref["robust_accuracy"]),
            }
    return out


_STYLE = {OFFICIAL: ("black", "o", "AutoAttack (official)"), "standard": ("tab:blue", "s", None),
          "adaptive": ("tab:red", "D", None)}


def plot_strength_per_cost(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Robust accuracy against forward+backward passes per sample spent, one panel per
    comparison JSON (:func:`compare`'s output with ``model``), one line per method with a
    point after each stage (log x-axis; the clean accuracy is in the panel's title). Returns
    the PNG's path."""
    if not results:
        raise ValueError("no comparison results to plot")
    # Deferred: matplotlib takes about 1 s to import; only drawing the figure needs it.
    from matplotlib.ticker import NullFormatter as _NullFormatter

    fig = _figure()
    fig.set_size_inches(5.5 * len(results), 4.5)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, res in zip(axes, results):
        clean = None
        for method, summary in res["methods"].items():
            color, marker, label = _STYLE.get(method, ("tab:green", "^", None))
            pts = [p for p in summary["curve"] if p["stage"] != "clean"]
            clean = next((p["robust_accuracy"] for p in summary["curve"]
                          if p["stage"] == "clean"), clean)
            xs = [p["passes_per_sample"] for p in pts]
            ys = [100 * p["robust_accuracy"] for p in pts]
            ax.plot(xs, ys, marker=marker, color=color, alpha=0.85,
                    label=f"{label or method}: {ys[-1]:.1f}% at {xs[-1]:,.0f}")
            for p, xv, yv in zip(pts, xs, ys):
                ax.annotate(p["stage"], (xv, yv), textcoords="offset points", xytext=(2, 5),
                            fontsize=7, color=color, rotation=35)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(_NullFormatter())
        left, right = ax.get_xlim()
        ticks = [t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
                 if left <= t <= right]
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo - max(1.0, 0.1 * (hi - lo)), hi + max(2.0, 0.4 * (hi - lo)))
        ax.set_xlabel("forward + backward passes per sample (log)")
        ax.set_ylabel("robust accuracy (%)")
        threat = res.get("threat", {})
        ax.set_title(f"{res.get('model', '')}, {threat.get('norm', '')} {threat.get('eps', '')}, "
                     f"n={res.get('n', '')}"
                     + (f", clean {100 * clean:.1f}%" if clean is not None else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, Path(path))


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The comparisons as one Markdown table: per model and method, robust accuracy, median
    wall time, passes per sample, and the ratios to the official AutoAttack."""
    lines = ["| model | method | robust acc | wall (median) | passes/sample | "
             "time vs AA | passes vs AA | points vs AA |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for method, s in res["methods"].items():
            vs = s.get("vs_autoattack")
            ratio = (f"{vs['seconds_ratio']:.3f}x | {vs['passes_ratio']:.3f}x | "
                     f"{vs['robust_accuracy_points']:+.1f}") if vs else "1 | 1 | 0"
            runs = len(s["seconds_all"])
            lines.append(f"| {res.get('model', '')} | {method} | {s['robust_accuracy']:.3f} | "
                         f"{s['seconds']:.0f} s ({runs} run{'s' if runs > 1 else ''}) | "
                         f"{s['passes_per_sample']:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-cnn-pgdat", help="a zoo model name")
    parser.add_argument("--n", type=int, default=500, help="test samples (default 500)")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--methods", default=f"{OFFICIAL},adaptive,standard",
                        help=f"comma-separated: {OFFICIAL} and/or unmask presets")
    parser.add_argument("--once", default="standard",
                        help="comma-separated methods run in the first round only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--channels-last", action="store_true",
                        help="the (shared) model in channels_last memory format")
    parser.add_argument("--golden", action="store_true",
                        help="also compare APGD-CE and APGD-T with the official ones")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", nargs="+", metavar="JSON",
                        help="draw no new numbers: plot these comparison JSONs to --figure and "
                             "print their table")
    parser.add_argument("--figure", metavar="PNG", default="docs/figures/strength-per-cost.png")
    args = parser.parse_args(argv)
    if args.plot:
        results = [json.loads(Path(p).read_text()) for p in args.plot]
        print(markdown_table(results))
        print(f"figure: {plot_strength_per_cost(results, args.figure)}")
        return 0
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    _official()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = zoo.load(args.model, device="cpu")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = data.load(zoo.get(args.model).dataset, "test", n=args.n)
    threat = Threat(args.norm, args.eps)
    methods = [m for m in args.methods.split(",") if m]
    once = [m for m in args.once.split(",") if m]
    meta = {"model": args.model, "n": int(len(y)), "threat": threat.to_dict(),
            "seed": args.seed, "repeats": args.repeats, "once": once,
            "channels_last": args.channels_last,
            "environment": {"threads": torch.get_num_threads(), "device": "cpu",
                            "versions": {**versions(), "pyautoattack": _version("pyautoattack")}}}

    def keep(partial: dict[str, Any]) -> None:
        if args.json:
            atomic_write(args.json, json.dumps({**partial, **meta}, indent=2).encode())

    try:
        out = compare(model, x, y, threat, methods=methods, repeats=args.repeats, once=once,
                      seed=args.seed, golden=args.golden, progress=print, checkpoint=keep)
    except ValueError as err:
        parser.error(str(err))
    out.update(meta)
    for m, s in out["methods"].items():
        vs = s.get("vs_autoattack")
        extra = (f"; vs AutoAttack: {vs['seconds_ratio']:.2f}x time, {vs['passes_ratio']:.2f}x "
                 f"passes, {vs['robust_accuracy_points']:+.1f} points") if vs else ""
        print(f"{m:>12}: robust {s['robust_accuracy']:.3f}, {s['seconds']:.1f} s, "
              f"{s['passes_per_sample']:,.0f} passes/sample{extra}")
    keep(out)
    return 0


def _version(dist: str) -> str:
    try:
        return version(dist)
    except Exception:  # pragma: no cover - not installed from a distribution
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
