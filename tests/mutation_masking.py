"""Mutation testing of the masking checks: mutmut's mutation operators, run in one process.

    python tests/mutation_masking.py [--modules outputs,gradients] [--json PATH]

For every mutant mutmut (2.x) generates in the check modules of ``unmask.defenses.masking``
(``outputs``, ``gradients``, ``stats``, ``comparisons``, ``optimisation``, ``binarization``;
string mutations are left out: rule texts and sources are documentation), the mutated source is
written, the check modules are reloaded (the registry is rebuilt), and the controls of
``tests/test_masking_checks.py`` run on the checks the mutated module registers: the contract
(every check registered, with controls), each positive control must fire with its declared
evidence, the negative control must pass, the output checks must run when no sample is
correctly classified, and the significance test must give scipy's exact p-values. A mutant is killed when any of them fails
(an exception counts), timed out after ``--timeout`` seconds, or it survived. The file is
restored after every mutant, also on Ctrl-C.

mutmut's own runner starts a fresh pytest per mutant (about 15 s each here, hours for the
package); reloading in process costs about a second per mutant. Run from the repository root
(the modules are reloaded from the working tree, so use an editable install).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import time
from pathlib import Path

import mutmut

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODULES = ("stats", "outputs", "gradients", "comparisons", "optimisation", "binarization")
# Which checks' controls a mutant of each module can change (stats feeds every comparison).
TYPES = set(mutmut.mutations_by_type) - {"string", "fstring", "annassign"}


class _Config:
    """What mutmut's Context reads of its Config when filtering mutation types."""

    mutation_types_to_apply = TYPES
    covered_lines_by_filename = None
    coverage_data = None


def _mutants(path: Path) -> list:
    ctx = mutmut.Context(filename=str(path), config=_Config())
    return mutmut.list_mutations(ctx)


def _mutated_source(path: Path, mutation_id) -> str:
    ctx = mutmut.Context(filename=str(path), mutation_id=mutation_id, config=_Config())
    source, done = mutmut.mutate(ctx)
    if done != 1:
        raise RuntimeError(f"mutant {mutation_id} applied {done} mutations")
    return source


def _reload(masking) -> None:
    """Rebuild the registry from the (possibly mutated) check modules."""
    masking.CHECKS.clear()
    for name in MODULES:
        module = importlib.reload(sys.modules[f"unmask.defenses.masking.{name}"])
        # The package re-exports names (exceeds_share, the thresholds): point them at the
        # reloaded module's, as a fresh import would.
        for attr in masking.__all__:
            if attr in module.__dict__:
                setattr(masking, attr, module.__dict__[attr])


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _limit(seconds: int):
    def fire(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _controls(T, test_masking, masking, names, cnn, batch) -> None:
    """The controls of ``names``; raises (AssertionError or any error) when one fails."""
    T.test_every_registered_check_has_controls()
    T.test_output_checks_run_when_no_sample_is_correct(cnn, batch)
    # The significance test's own test (exact p-values against scipy, edge cases).
    test_masking.test_attack_comparisons_need_a_significant_count_not_one_or_two_samples()
    for name in names:
        T.assert_fires(name, cnn, batch)
        if name in T.EXTRA_NEGATIVES:
            T.assert_extra_negative(name, cnn, batch)
    ctx = masking.Context(cnn, *batch, T.NEGATIVE_THREAT, budget=masking.Budget.for_mode(True),
                          generator=0, surrogate=cnn)
    for r in masking.run_checks(ctx, names):
        assert r.skipped is None and r.passed, f"{r.name} fired on the negative control"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", default=",".join(MODULES),
                   help=f"comma-separated check modules (default: {','.join(MODULES)})")
    p.add_argument("--timeout", type=int, default=120, help="seconds per mutant")
    p.add_argument("--json", metavar="PATH", help="write the results (and survivors) as JSON")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import test_masking
    import test_masking_checks as T

    from unmask.bench import data, zoo
    from unmask.defenses import masking

    cnn = zoo.load("mnist-cnn", device="cpu", progress=False)
    x, y = data.load("mnist5k", "test")
    batch = (x[:32], y[:32])
    base = ROOT / "defenses" / "masking"
    by_module = {m: [c.name for c in masking.CHECKS.values() if c.module.endswith("." + m)]
                 for m in MODULES}
    all_names = list(masking.CHECKS)
    _controls(T, test_masking, masking, all_names, cnn, batch)  # the unmutated code passes its controls

    results, start = {}, time.perf_counter()
    for module in args.modules.split(","):
        path = base / f"{module}.py"
        names = by_module[module] or all_names
        if module == "stats":
            names = [n for n, c in masking.CHECKS.items() if c.family in ("attacks",
                                                                         "optimisation")]
        original = path.read_text()
        counts = {"killed": 0, "timeout": 0, "survived": 0}
        survivors = []
        mutants = _mutants(path)
        print(f"{module}: {len(mutants)} mutants", flush=True)
        try:
            for mid in mutants:
                path.write_text(_mutated_source(path, mid))
                status = "survived"
                try:
                    with _limit(args.timeout):
                        _reload(masking)
                        _controls(T, test_masking, masking, names, cnn, batch)
                except _Timeout:
                    status = "timeout"
                except Exception:  # an assertion or any crash: the tests noticed
                    status = "killed"
                finally:
                    path.write_text(original)
                counts[status] += 1
                if status == "survived":
                    survivors.append({"line": mid.line_number + 1, "source": mid.line.strip(),
                                      "mutant": _mutated_source(path, mid).splitlines()[
                                          mid.line_number].strip()})
        finally:
            path.write_text(original)
            _reload(masking)
        results[module] = {**counts, "total": len(mutants), "survivors": survivors}
        score = (counts["killed"] + counts["timeout"]) / max(len(mutants), 1)
        print(f"{module}: killed {counts['killed']}, timed out {counts['timeout']}, survived "
              f"{counts['survived']} of {len(mutants)}: score {score:.1%}", flush=True)
        for s in survivors:
            print(f"  {module}.py:{s['line']}: {s['source']}  ->  {s['mutant']}", flush=True)
    total = sum(r["total"] for r in results.values())
    caught = sum(r["killed"] + r["timeout"] for r in results.values())
    print(f"total: {caught} of {total} mutants killed ({caught / max(total, 1):.1%}) in "
          f"{time.perf_counter() - start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"modules": results, "total": total,
                                               "killed": caught}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
