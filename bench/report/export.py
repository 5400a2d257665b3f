"""Results that travel: a run of the store as RobustBench ``model_info`` records and as
per-sample outcome tables for pandas.

RobustBench (Croce et al., NeurIPS 2021 Datasets and Benchmarks) keeps one reviewable JSON
record per leaderboard entry under ``model_info/<dataset>/<threat model>/<name>.json``, with
accuracies as percent strings (``"clean_acc": "92.44"``) and ``unreliable`` set for defenses
later shown to mask. :func:`export_robustbench` writes the same files, the same field names and
types, with the robust accuracy of the row in ``autoattack_acc`` (the field a RobustBench user
reads; the footnote names the attacks that produced it) and unmask's evidence under the extra
key ``unmask`` (verdict, failing checks, interval, n, cost, fingerprint, run provenance).

:func:`export_samples` writes one row per (model, threat, sample): the label, whether the
clean input was classified correctly, whether the sample survived, the attack that broke it
and its margin, as CSV or Parquet (``pyarrow`` needed for the latter).

Usage::

    with Store("results/unmask.sqlite", readonly=True) as st:
        export_robustbench(st, run_id, Path("export/model_info"))
        export_samples(st, run_id, Path("export/samples.csv"))
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.fileio import atomic_write
from ..suite.store import Store
from . import frames

__all__ = ["robustbench_records", "export_robustbench", "samples_frame", "export_samples",
           "ROBUSTBENCH_FIELDS", "SAMPLE_FORMATS"]

# The fields of a RobustBench model_info record and their JSON types (read from the records
# under robustbench/model_info/cifar10/Linf/); "external" is optional there and here.
ROBUSTBENCH_FIELDS: dict[str, type] = {
    "link": str, "name": str, "authors": str, "additional_data": bool,
    "number_forward_passes": int, "dataset": str, "venue": str, "architecture": str,
    "eps": str, "clean_acc": str, "reported": str, "footnote": str, "autoattack_acc": str,
    "unreliable": bool,
}
_THREAT_DIR = {"linf": "Linf", "l2": "L2"}
SAMPLE_FORMATS = ("csv", "parquet")


def _percent(value: float) -> str:
    return f"{100.0 * float(value):.2f}"


def _eps_text(eps: float) -> str:
    """RobustBench writes eps as a string, as a fraction of 255 where it is one."""
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and round(k) < 255:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def robustbench_records(store: Store, run_id: int) -> list[dict[str, Any]]:
    """One RobustBench-style record per (model, threat) row of the run's leaderboard."""
    run = store.run(run_id)
    config = run.config if isinstance(run.config, dict) else {}
    dataset = str(config.get("dataset", "unknown"))
    attacks = config.get("attacks") or {}
    attack_text = (f"the {attacks['preset']} ensemble" if attacks.get("preset")
                   else "the suite's attack list")
    df = frames.leaderboard_frame(store, run_id)
    out = []
    for row in df.to_dict("records"):
        verdict = str(row.get("masking") or "not run")
        robust = float(row["robust_accuracy"])
        stochastic = bool(row.get("stochastic"))
        footnote = (f"Per-sample worst case over {attack_text} at {row['threat']} on "
                    f"{int(row['n'])} {dataset} {config.get('split', 'test')} samples "
                    f"(unmask run {run_id}, seed {run.seed}); masking diagnosis: {verdict}.")
        if stochastic:
            footnote += " Randomised model: judged by majority over fresh draws."
        record: dict[str, Any] = {
            "link": "", "name": str(row["model"]), "authors": "", "additional_data": False,
            # RobustBench counts the forward passes the model needs per prediction.
            "number_forward_passes": 1, "dataset": dataset, "venue": "",
            "architecture": str(row.get("source") or ""), "eps": _eps_text(float(row["eps"])),
            "clean_acc": _percent(row["clean_accuracy"]), "reported": "",
            "footnote": footnote, "autoattack_acc": _percent(robust),
            "unreliable": verdict == "masked",
        }
        record["unmask"] = {
            "threat_model": _THREAT_DIR.get(str(row["norm"]), str(row["norm"])),
            "norm": str(row["norm"]), "eps": float(row["eps"]),
            "clean_accuracy": float(row["clean_accuracy"]), "robust_accuracy": robust,
            "ci95": [float(row["ci_low"]), float(row["ci_high"])], "n": int(row["n"]),
            "verdict": verdict, "failing_checks": str(row.get("failing_checks") or ""),
            "broken_by": str(row.get("broken_by") or ""),
            "rank": None if pd.isna(row.get("rank")) else int(row["rank"]),
            "attack_forwards": int(row.get("forwards") or 0),
            "attack_backwards": int(row.get("backwards") or 0),
            "checkpoint_sha256": str(row.get("checkpoint_sha256") or ""),
            "stochastic": stochastic, "run_id": run_id, "seed": run.seed,
            "git_commit": run.git_commit, "versions": run.versions,
        }
        out.append(record)
    return out


def export_robustbench(store: Store, run_id: int, out_dir: Path) -> list[Path]:
    """Write ``out_dir/<dataset>/<Linf|L2>/<model>[_eps<e>].json`` per row; the paths."""
    records = robustbench_records(store, run_id)
    per_threat: dict[tuple[str, str], int] = {}
    for r in records:
        key = (r["name"], r["unmask"]["threat_model"])
        per_threat[key] = per_threat.get(key, 0) + 1
    paths = []
    for r in records:
        threat_dir = r["unmask"]["threat_model"]
        stem = _safe_name(r["name"])
        if per_threat[(r["name"], threat_dir)] > 1:  # several eps of one norm: one file each
            stem += f"_eps{r['unmask']['eps']:g}"
        path = Path(out_dir) / r["dataset"] / threat_dir / f"{stem}.json"
        atomic_write(path, (json.dumps(r, indent=2) + "\n").encode("utf-8"))
        paths.append(path)
    return paths


def samples_frame(store: Store, run_id: int) -> pd.DataFrame:
    """Per-sample outcomes of the run: model, norm, eps, sample, label, clean_correct, robust,
    broken_by (None when robust) and margin (negative when broken)."""
    store.run(run_id)  # an unknown run is an error naming the known ones, not an empty table
    rows = store.rows("samples", run_id)
    cols = ["model", "norm", "eps", "sample", "label", "clean_correct", "robust", "broken_by",
            "margin"]
    df = pd.DataFrame([{c: r[c] for c in cols} for r in rows], columns=cols)
    if not df.empty:
        df["clean_correct"] = df["clean_correct"].astype(bool)
        df["robust"] = df["robust"].astype(bool)
        df["margin"] = [m if m is None or math.isfinite(m) else None for m in df["margin"]]
    return df


def export_samples(store: Store, run_id: int, path: Path, fmt: str | None = None) -> Path:
    """Write :func:`samples_frame` to ``path`` as CSV or Parquet (from the suffix by default)."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in SAMPLE_FORMATS:
        raise ValueError(f"unknown sample format {fmt!r}; expected one of "
                         f"{', '.join(SAMPLE_FORMATS)}")
    df = samples_frame(store, run_id)
    if fmt == "csv":
        atomic_write(path, df.to_csv(index=False).encode("utf-8"))
        return path
    try:
        # Deferred: pyarrow is optional; only Parquet export needs it.
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError("Parquet export needs pyarrow (pip install pyarrow); "
                         "CSV needs nothing: --format csv") from None
    atomic_write(path, lambda fh: df.to_parquet(fh, index=False))
    return path
