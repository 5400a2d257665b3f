"""Soundness and tightness of the certified bounds (IBP <= CROWN <= MILP <= attack)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unmask.bench.core import Normalize, Threat
from unmask.defenses.certified import (
    NotSupportedError,
    SoundnessError,
    assert_sound,
    certify,
    margin_lower_bound,
)
from unmask.defenses.certified.bounds import margin_spec


def _mlp(seed: int, hidden: int = 12, n_in: int = 6, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)  # test-only weight init, tests are seeded
    return nn.Sequential(Normalize((0.5,), (0.5,)), nn.Flatten(), nn.Linear(n_in, hidden),
                         nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, k)).eval()


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(Normalize((0.3,), (0.4,)), nn.Conv2d(1, 3, 3, padding=1), bn, nn.ReLU(),
                         nn.AvgPool2d(2), nn.Sequential(nn.Flatten(), nn.Linear(3 * 3 * 3, 8)),
                         nn.ReLU(), nn.Linear(8, 4)).eval()


def _data(shape, n=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + shape, generator=g), torch.randint(0, k, (n,), generator=g)


def _sampled_margin_min(model, x, y, threat, n_points=4000, seed=1):
    """Min over random points in the ball (and its corners for Linf) of each margin."""
    g = torch.Generator().manual_seed(seed)
    mins = []
    for i in range(x.shape[0]):
        if threat.norm.value == "linf":
            d = (torch.rand((n_points,) + x.shape[1:], generator=g) * 2 - 1) * threat.eps
            d[: n_points // 2] = d[: n_points // 2].sign() * threat.eps
        else:
            d = torch.randn((n_points,) + x.shape[1:], generator=g)
            d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
            r = torch.rand(n_points, generator=g).view(-1, *[1] * (x.dim() - 1)) ** (1 / x[0].numel())
            d = d * r * threat.eps
        pts = (x[i : i + 1] + d).clamp(0, 1)
        z = model(pts)
        spec = margin_spec(y[i : i + 1].expand(n_points), z.shape[1])
        mins.append((spec @ z.unsqueeze(-1)).squeeze(-1).min(0).values)
    return torch.stack(mins)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("linf", 0.2), ("l2", 0.3)])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_bounds_contain_sampled_outputs_and_ibp_below_crown(kind, norm, eps):
    model = _mlp(0) if kind == "mlp" else _cnn(0)
    shape = (1, 2, 3) if kind == "mlp" else (1, 6, 6)
    k = 3 if kind == "mlp" else 4
    x, y = _data(shape, k=k)
    threat = Threat(norm, eps)
    with torch.no_grad():
        sampled = _sampled_margin_min(model, x, y, threat)
    ibp = margin_lower_bound(model, x, y, threat, method="ibp")
    crown = margin_lower_bound(model, x, y, threat, method="crown")
    assert (crown <= sampled + 1e-5).all(), (crown - sampled).max()
    assert (ibp <= sampled + 1e-5).all()
    assert (ibp <= crown + 1e-5).all()
    assert (crown > ibp + 1e-4).any()  # CROWN is strictly tighter somewhere


def test_crown_is_exact_on_a_single_linear_layer():
    torch.manual_seed(3)
    lin = nn.Linear(8, 4)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(5, 1, 2, 4, generator=g)  # ball stays inside [0, 1]
    y = torch.tensor([0, 1, 2, 3, 0])
    eps = 0.1
    got = margin_lower_bound(model, x, y, Threat("linf", eps), method="crown")
    with torch.no_grad():
        z = model(x)
    w = lin.weight.detach()
    for i in range(5):
        others = [j for j in range(4) if j != int(y[i])]
        for c, j in enumerate(others):
            dw = w[int(y[i])] - w[j]
            exact = z[i, int(y[i])] - z[i, j] - eps * dw.abs().sum()
            assert abs(float(got[i, c]) - float(exact)) < 1e-5
    # L2: margin - eps * ||w_y - w_j||_2
    got2 = margin_lower_bound(model, x, y, Threat("l2", eps), method="crown")
    dw = w[int(y[0])] - w[1]
    assert abs(float(got2[0, 0]) - float(z[0, 0] - z[0, 1] - eps * dw.norm())) < 1e-5


def test_milp_is_between_crown_and_attack_and_counterexamples_are_real():
    model = _mlp(1, hidden=8)
    x, y = _data((1, 2, 3), n=8, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct
    threat = Threat("linf", 0.15)
    crown = margin_lower_bound(model, x, y, threat, method="crown").min(1).values
    with torch.no_grad():
        sampled = _sampled_margin_min(model, x, y, threat).min(1).values
    res = certify(model, x, y, threat, method="milp", time_limit=20)
    assert "unknown" not in res.status
    assert {"certified", "broken"} <= set(res.status) or len(set(res.status)) == 1
    for i in range(x.shape[0]):
        assert crown[i] <= res.lower[i] + 1e-5
        assert res.lower[i] <= float(sampled[i]) + 1e-4
        if res.status[i] == "broken":
            xa = torch.tensor(res.x_adv[i]).view_as(x[i])
            assert float((xa - x[i]).abs().max()) <= threat.eps + 1e-6
            assert int(model(xa.unsqueeze(0)).argmax(1)) != int(y[i])
        else:
            assert res.lower[i] > 0
    # the exact answer: every sample the sampling broke is broken, none certified
    for i in range(x.shape[0]):
        if float(sampled[i]) < 0:
            assert res.status[i] == "broken"


def test_not_supported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    x, y = _data((1, 6, 6), k=2)
    with pytest.raises(NotSupportedError, match="not supported: MaxPool2d"):
        certify(model, x, y, Threat("linf", 0.1))


def test_soundness_stop_names_the_sample():
    model = _mlp(0)
    x, y = _data((1, 2, 3))
    with torch.no_grad():
        y = model(x).argmax(1)
    res = certify(model, x, y, Threat("linf", 0.001), method="crown")
    assert all(res.certified)
    assert_sound(res, [False] * x.shape[0])
    with pytest.raises(SoundnessError, match="sample 42"):
        assert_sound(res, [False, True] + [False] * (x.shape[0] - 2), sample_ids=list(range(41, 47)))


def test_bad_method_and_milp_l2_are_rejected():
    model = _mlp(0)
    x, y = _data((1, 2, 3))
    with pytest.raises(ValueError, match="method"):
        certify(model, x, y, Threat("linf", 0.1), method="foo")
    with pytest.raises(ValueError, match="linf"):
        certify(model, x, y, Threat("l2", 0.1), method="milp")


# --- [certify] in a suite run -----------------------------------------------------------------

NOT_SUPPORTED_MODULE = '''
from torch import nn


def pooled():
    """A digits model with max pooling: the bounds do not support it."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 10)).eval()
'''

CERTIFY_SUITE = """
name = "cert"
dataset = "digits"
n = 32
batch_size = 16
seed = 0
models = [{models}]

[[threats]]
norm = "linf"
eps = 0.1

[attacks]
preset = "quick"

[masking]
enabled = false

[certify]
methods = ["ibp", "crown", "milp"]
time_limit = 5.0
"""


@pytest.fixture
def certify_suite(tmp_path, zoo_cache):
    """A suite file on digits with [certify], and a module with an unsupported user model."""
    import sys

    (tmp_path / "certmods.py").write_text(NOT_SUPPORTED_MODULE)
    sys.path.insert(0, str(tmp_path))

    def make(models: str):
        path = tmp_path / "cert.toml"
        path.write_text(CERTIFY_SUITE.format(models=models))
        return path

    yield make
    sys.path.remove(str(tmp_path))
    sys.modules.pop("certmods", None)


def test_suite_certify_rows_bracket_the_attack_and_record_not_supported(tmp_path,
                                                                       certify_suite):
    from unmask.bench.report.leaderboard import leaderboard_frame, render
    from unmask.bench.suite.runner import run_suite
    from unmask.bench.suite.spec import load_suite
    from unmask.bench.suite.store import Store

    suite = load_suite(certify_suite('"digits-mlp", "certmods:pooled"'))
    summary = run_suite(suite, store=tmp_path / "r.sqlite", progress=False)
    assert summary.status == "finished"
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        rows = st.rows("certified", summary.run_id)
        samples = st.rows("certified_samples", summary.run_id)
        df = leaderboard_frame(st, summary.run_id)
        md = render(st, summary.run_id, "md")
        csv = render(st, summary.run_id, "csv")
        attack = {(s["eps"], s["sample"]): s for s in st.rows("samples", summary.run_id)
                  if s["model"] == "digits-mlp"}
    ok = [r for r in rows if r["model"] == "digits-mlp"]
    assert {r["method"] for r in ok} == {"ibp", "crown", "milp"}
    assert all(r["status"] == "ok" and r["n"] == 32 and r["eps"] == 0.1 for r in ok)
    for eps in (0.1,):
        acc = {r["method"]: r["certified_accuracy"] for r in ok if r["eps"] == eps}
        assert acc["ibp"] <= acc["crown"] <= acc["milp"]
        # every sample decided by the MILP on this tiny MLP, and the exact verdicts agree
        # with the attack: certified samples were robust to it
        milp = [s for s in samples if s["model"] == "digits-mlp" and s["eps"] == eps
                and s["method"] == "milp"]
        assert len(milp) == 32 and {s["status"] for s in milp} <= {"certified", "broken"}
        for s in milp:
            if s["status"] == "certified":
                assert attack[(eps, s["sample"])]["robust"] == 1
                assert s["lower"] > 0
    pooled = [r for r in rows if r["model"] == "certmods:pooled"]
    assert len(pooled) == 3 and all(r["status"] == "not supported" for r in pooled)
    assert all("not supported: MaxPool2d" in r["reason"] for r in pooled)
    assert all(r["certified_accuracy"] is None for r in pooled)
    # the leaderboard: certified <= robust, gap = robust - certified, exact where they meet
    mlp = df[df["model"] == "digits-mlp"]
    assert len(mlp) == 1
    for _, row in mlp.iterrows():
        assert row["certified_method"] == "milp"
        assert row["certified"] <= row["robust_accuracy"] + 1e-12
        assert abs(row["gap"] - (row["robust_accuracy"] - row["certified"])) < 1e-12
        assert bool(row["exact"]) == (abs(row["gap"]) < 1e-12)
    # the MILP decides every sample here and its counterexamples join the worst case: exact
    assert mlp["exact"].astype(bool).all()
    pool_row = df[df["model"] == "certmods:pooled"].iloc[0]
    assert pd_isna(pool_row["certified"]) and "MaxPool2d" in pool_row["certified_note"]
    assert "certified" in csv.splitlines()[0] and "gap" in csv.splitlines()[0]
    assert "(milp, exact)" in md and "n/a: not supported: MaxPool2d (certmods:pooled)" in md


def pd_isna(v) -> bool:
    import math

    return v is None or (isinstance(v, float) and math.isnan(v))


def test_suite_soundness_stop_names_the_sample(tmp_path, certify_suite, monkeypatch):
    import unmask.defenses.certified as certified
    from unmask.bench.suite import runner
    from unmask.bench.suite.runner import CertifiedSoundnessError, run_suite
    from unmask.bench.suite.spec import load_suite
    from unmask.bench.suite.store import Store

    real = certified.certify

    def lying(model, x, y, threat, **kw):  # a broken certifier: every sample "certified"
        res = real(model, x, y, threat, **kw)
        return certified.CertifyResult(res.method, threat, [1.0] * res.n,
                                       ["certified"] * res.n, res.seconds, [None] * res.n)

    monkeypatch.setattr(runner, "certify", lying)  # the runner calls certify directly
    suite = load_suite(certify_suite('"digits-mlp"'))
    with pytest.raises(CertifiedSoundnessError) as err:
        run_suite(suite, store=tmp_path / "r.sqlite", progress=False)
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        run = st.latest_run()
        broken = [s for s in st.rows("samples", run.run_id) if not s["robust"]]
        errors = [r for r in st.rows("sections", run.run_id) if r["section"] == "certify"]
    first = min(s["sample"] for s in broken)
    assert f"sample {first} is certified robust by ibp" in str(err.value)
    assert "digits-mlp at linf:0.1" in str(err.value)
    assert run.status == "failed"
    assert errors and f"sample {first}" in errors[0]["reason"]


def test_store_without_certified_tables_reads_empty_and_gains_them(tmp_path):
    import sqlite3

    from unmask.bench.suite.store import Store

    path = tmp_path / "old.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)  # a store written before [certify] existed
    conn.execute("DROP TABLE certified")
    conn.execute("DROP TABLE certified_samples")
    conn.commit()
    conn.close()
    with Store(path, readonly=True) as st:
        assert st.rows("certified", 1) == [] and st.rows("certified_samples", 1) == []
    with Store(path) as st:  # opened for writing: the tables are added, nothing else changes
        run = st.start_run(suite="s", config={}, config_hash="h", seed=0, quick=False,
                           git_commit=None, versions={}, device="cpu")
        with st.unit(run, "certify/m/linf:0.1") as tx:
            tx.add_certified([{"model": "m", "norm": "linf", "eps": 0.1, "method": "ibp",
                               "n": 1, "certified": 0, "broken": 1, "unknown": 0,
                               "certified_accuracy": 0.0, "seconds": 0.1, "status": "ok",
                               "reason": ""}],
                             [{"model": "m", "norm": "linf", "eps": 0.1, "method": "ibp",
                               "sample": 0, "status": "broken", "lower": float("-inf"),
                               "counterexample": 0}])
        assert st.rows("certified", run)[0]["certified_accuracy"] == 0.0
        assert st.rows("certified_samples", run)[0]["lower"] is None  # -inf stored as NULL


def test_cli_certify_prints_each_method_and_names_unsupported_layers(zoo_cache, capsys,
                                                                     tmp_path):
    import json

    from unmask.bench.cli.main import main

    out_json = tmp_path / "c.json"
    assert main(["certify", "digits-mlp", "--eps", "0.1", "--n", "12", "--methods", "ibp",
                 "milp", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln[:4] in ("ibp ", "milp")}
    assert set(lines) == {"ibp", "milp"}
    saved = json.loads(out_json.read_text())
    assert [r["method"] for r in saved] == ["ibp", "milp"]
    assert float(lines["ibp"][1]) == pytest.approx(saved[0]["certified_accuracy"], abs=5e-4)
    assert saved[0]["certified_accuracy"] <= saved[1]["certified_accuracy"]
    assert "unknown" not in saved[1]["status"]  # the MILP decides every sample of digits-mlp
    assert main(["certify", "digits-mlp", "--eps", "0.1", "--methods", "alpha"]) == 2
    assert "unknown method 'alpha'" in capsys.readouterr().err
    assert main(["certify", "mnist-cnn", "--eps", "0.1", "--n", "2"]) == 2
    assert "not supported: MaxPool2d" in capsys.readouterr().err


def test_certify_table_row_orders_the_bounds_and_writes_between_markers(zoo_cache, tmp_path):
    from unmask.bench.report.certify_table import MARKERS, certify_row, markdown_table, write_table
    from unmask.bench.suite.spec import parse_suite

    suite = parse_suite({"name": "t", "dataset": "digits", "models": ["digits-mlp"],
                         "threats": [{"norm": "linf", "eps": [0.1]}], "n": 16,
                         "batch_size": 16, "attacks": {"preset": "quick"}})
    row = certify_row("digits-mlp", 0.1, n=16, milp_n=12, suite=suite)
    assert row.ibp <= row.crown <= row.milp  # certified accuracies, each a lower bound
    assert row.milp_unknown == 0 and row.milp <= row.attack_milp
    assert row.worst_case <= row.attack and row.note == ""
    table = markdown_table([row])
    assert "| digits-mlp | 0.1 | 16 |" in table and "(first 12, attack there" in table
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{MARKERS[0]}\nold\n{MARKERS[1]}\nrest\n")
    write_table(doc, table)
    text = doc.read_text()
    assert "old" not in text and table in text and text.endswith("rest\n")


def test_certify_methods_reports_unavailable_milp_and_l2(monkeypatch):
    import sys

    from unmask.bench.suite.runner import certify_methods

    model = _mlp(0)
    x, y = _data((1, 2, 3))
    monkeypatch.setitem(sys.modules, "highspy", None)  # `import highspy` raises ImportError
    rows = certify_methods(model, x, y, Threat("linf", 0.05), methods=("crown", "milp"),
                           time_limit=1.0)
    assert [r.status for r in rows] == ["ok", "unavailable"]
    assert "highspy" in rows[1].reason and rows[1].result is None
    assert rows[0].result.n == x.shape[0]
    monkeypatch.undo()
    rows = certify_methods(model, x, y, Threat("l2", 0.05), methods=("ibp", "milp"),
                           time_limit=1.0)
    assert [r.status for r in rows] == ["ok", "not supported"]
    assert "linf" in rows[1].reason
