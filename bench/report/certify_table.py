"""The certified bracket of zoo models: IBP, CROWN and exact (MILP) certified robust accuracy
next to the attack's robust accuracy, on the default suite's samples, with the cost of each.

Per model and Linf eps, on the first ``n`` samples of the suite's split (mnist5k test, n = 100,
seed 0 by default): clean accuracy; certified robust accuracy by IBP, CROWN and the MILP
(:func:`unmask.defenses.certified.certify`), with how many samples the MILP left undecided;
the robust accuracy of the suite's attack ensemble (``[attacks]`` of the default suite,
evaluated as the suite does, :func:`unmask.bench.suite.runner.evaluate_cell`) and the per-sample
worst case of the ensemble and the MILP's counterexamples (what the leaderboard's row
reports); and seconds per sample of every method. Every certified sample is checked against
the attack (:func:`~unmask.defenses.certified.assert_sound`): a sample certified robust that
the attack broke raises.

One command regenerates the table in ``docs/certified.md``::

    UNMASK_CACHE=/work/cache/zoo OMP_NUM_THREADS=1 python -m unmask.bench.report.certify_table \\
        --write docs/certified.md
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ...defenses.certified import NotSupportedError, assert_sound, certify
from .. import data, zoo
from ..core import Threat
from ..core.fileio import atomic_write, write_between_markers
from ..suite.runner import evaluate_cell
from ..suite.spec import load_suite

__all__ = ["CertifyRow", "DEFAULT_ROWS", "MARKERS", "certify_row", "markdown_table",
           "write_table", "main"]

MARKERS = ("<!-- certify-table:start -->", "<!-- certify-table:end -->")
# (zoo model, Linf eps): every certified-training entry at the suite's eps, the eps-0.1 CNN
# at its own eps too, and the standard CNN to show what "not supported" looks like.
DEFAULT_ROWS = (("mnist-mlp-ibp03", 0.3), ("mnist-cnn-ibp03", 0.3), ("mnist-cnn-ibp01", 0.3),
                ("mnist-cnn-ibp01", 0.1), ("mnist-cnn", 0.3))


@dataclass
class CertifyRow:
    """One model at one eps; accuracies in [0, 1] (None where a method does not apply) and
    seconds per sample; ``crown_n`` / ``milp_n`` the samples CROWN / the MILP ran on (the
    first ones), ``milp_unknown`` how many the MILP left undecided (time limit); ``note`` why
    a method did not apply."""

    model: str
    eps: float
    n: int
    clean: float
    ibp: float | None
    crown: float | None
    milp: float | None
    crown_n: int
    milp_n: int
    milp_unknown: int | None
    attack: float
    attack_milp: float  # the attack's robust accuracy on the MILP's samples
    worst_case: float
    ibp_s: float | None
    crown_s: float | None
    milp_s: float | None
    attack_s: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (every field)."""
        return asdict(self)


def certify_row(model_name: str, eps: float, *, n: int = 100, milp_n: int | None = None,
                crown_n: int | None = None, time_limit: float = 10.0, suite=None,
                device: str = "cpu") -> CertifyRow:
    """Measure one row (see the module docstring); ``milp_n`` / ``crown_n`` limit the MILP /
    CROWN to the first samples (default: all ``n``)."""

    suite = suite if suite is not None else load_suite(None)
    model = zoo.load(model_name, device=device, progress=False).eval()
    x, y = data.load(suite.dataset, suite.split, n=n)
    x, y = x.to(device), y.to(device)
    threat = Threat("linf", eps)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    start = time.perf_counter()
    parts = evaluate_cell(suite.build_attacks("linf", eps), model, x, y, seed=suite.seed,
                          batch_size=suite.batch_size, raise_errors=True)
    attack_s = (time.perf_counter() - start) / n
    robust = [bool(r) for p in sorted(parts, key=lambda p: p.b) for r in p.robust]
    broken = [not r for r in robust]
    out: dict[str, Any] = {}
    note = ""
    milp_n = n if milp_n is None else min(milp_n, n)
    crown_n = n if crown_n is None else min(crown_n, n)
    worst = list(broken)
    for method in ("ibp", "crown", "milp"):
        k = {"milp": milp_n, "crown": crown_n}.get(method, n)
        try:
            res = certify(model, x[:k], y[:k], threat, method=method, time_limit=time_limit)
        except NotSupportedError as err:
            out[method], out[f"{method}_s"] = None, None
            note = str(err)
            continue
        assert_sound(res, broken[:k])
        out[method], out[f"{method}_s"] = res.certified_accuracy, res.seconds_per_sample
        if method == "milp":
            out["milp_unknown"] = res.status.count("unknown")
            for i, adv in enumerate(res.x_adv):
                if adv is not None:
                    worst[i] = True
    return CertifyRow(model=model_name, eps=eps, n=n, clean=clean, ibp=out["ibp"],
                      crown=out["crown"], milp=out["milp"], crown_n=crown_n, milp_n=milp_n,
                      milp_unknown=out.get("milp_unknown"), attack=sum(robust) / n,
                      attack_milp=sum(robust[:milp_n]) / milp_n,
                      worst_case=(n - sum(worst)) / n, ibp_s=out["ibp_s"],
                      crown_s=out["crown_s"], milp_s=out["milp_s"], attack_s=attack_s,
                      note=note)


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.1f} s")


def markdown_table(rows: Sequence[CertifyRow]) -> str:
    """The rows as the Markdown table of docs/certified.md."""
    lines = ["| model | Linf eps | n | clean | IBP | CROWN | exact (MILP) | attack (suite "
             "ensemble) | worst case (attack + MILP) | time/sample IBP / CROWN / MILP / attack "
             "| note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.milp is None:
            milp = "-"
        else:
            milp = _acc(r.milp) + (f" (first {r.milp_n}, attack there {r.attack_milp:.2f})"
                                   if r.milp_n != r.n else "")
            milp += f", {r.milp_unknown} undecided" if r.milp_unknown else ", all decided"
        crown = _acc(r.crown) + (f" (first {r.crown_n})" if r.crown is not None
                                 and r.crown_n != r.n else "")
        lines.append(f"| {r.model} | {r.eps:g} | {r.n} | {r.clean:.2f} | {_acc(r.ibp)} | "
                     f"{crown} | {milp} | {r.attack:.2f} | {r.worst_case:.2f} | "
                     f"{_ms(r.ibp_s)} / {_ms(r.crown_s)} / {_ms(r.milp_s)} / "
                     f"{_ms(r.attack_s)} | {r.note} |")
    return "\n".join(lines) + "\n"


def write_table(path: str | Path, table: str) -> None:
    """Replace the text between :data:`MARKERS` in ``path`` by ``table`` (atomically)."""
    write_between_markers(path, MARKERS, table)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unmask.bench.report.certify_table [--rows model@eps ...] [--write FILE]``."""
    p = argparse.ArgumentParser(prog="python -m unmask.bench.report.certify_table",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=None, metavar="MODEL@EPS",
                   help="rows to measure (default: " +
                   " ".join(f"{m}@{e:g}" for m, e in DEFAULT_ROWS) + ")")
    p.add_argument("--n", type=int, default=100, help="samples (default: the suite's 100)")
    p.add_argument("--milp-n", type=int, default=None,
                   help="run the MILP on the first N samples only (default: all)")
    p.add_argument("--milp-n-conv", type=int, default=5,
                   help="MILP samples for conv nets (each takes up to --time-limit; default 5)")
    p.add_argument("--crown-n-conv", type=int, default=20,
                   help="CROWN samples for conv nets (seconds each on a CPU; default 20)")
    p.add_argument("--time-limit", type=float, default=10.0, help="MILP seconds per sample")
    p.add_argument("--write", default=None, help="replace the table between the markers here")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    wanted = DEFAULT_ROWS
    if args.rows:
        wanted = []
        for item in args.rows:
            name, _, eps = item.partition("@")
            if not eps:
                p.error(f"--rows takes MODEL@EPS, got {item!r}")
            wanted.append((name, float(eps)))
    rows = []
    for name, eps in wanted:
        conv = "cnn" in name
        milp_n = args.milp_n if args.milp_n is not None else (args.milp_n_conv if conv else None)
        row = certify_row(name, eps, n=args.n, milp_n=milp_n,
                          crown_n=args.crown_n_conv if conv else None,
                          time_limit=args.time_limit)
        print(json.dumps(row.to_dict()), flush=True)
        rows.append(row)
    table = markdown_table(rows)
    print(table)
    if args.write:
        write_table(args.write, table)
    if args.json:
        atomic_write(Path(args.json), json.dumps([r.to_dict() for r in rows], indent=1).encode())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
