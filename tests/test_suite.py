"""Suites: validation that names the offending key, the shipped default, and runs (resume
after an interruption, torchrun with 2 Gloo processes) that give the same table."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from suite_helpers import (
    BROKEN_MODULE,
    cell_table,
    sample_table,
    stored_masking_report,
    tiny_suite,
)

from unmask.bench.suite.runner import batch_seed, run_suite
from unmask.bench.suite.spec import SuiteError, load_suite, parse_suite
from unmask.bench.suite.store import Store

BASE = {"name": "t", "dataset": "digits", "models": ["digits-mlp"],
        "threats": [{"norm": "linf", "eps": [0.1]}]}


def _with(**changes):
    doc = {k: (list(v) if isinstance(v, list) else v) for k, v in BASE.items()}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("doc, key, words", [
    (_with(sede=1), "sede", "did you mean 'seed'"),
    (_with(n=0), "n", ">= 1"),
    (_with(n="100"), "n", "integer"),
    (_with(dataset="mnist"), "dataset", "mnist5k"),
    (_with(models=[]), "models", "non-empty"),
    (_with(models=["digits-mpl"]), "models[0].name", "Did you mean digits-mlp"),
    (_with(models=["digits-mlp", {"name": "mnist-cnn"}]), "models[1].name", "mnist5k"),
    (_with(models=[{"name": "digits-mlp", "optinal": True}]), "models[0].optinal", "unknown"),
    (_with(models=["not a module:fn"]), "models[0].name", "module:function"),
    (_with(models=["digits-mlp", "digits-mlp"]), "models[1]", "twice"),
    (_with(threats=[{"norm": "l1", "eps": 0.1}]), "threats[0].norm", "'linf'"),
    (_with(threats=[{"norm": "linf", "eps": [0.1, -0.2]}]), "threats[0].eps[1]", ">= 0"),
    (_with(threats=[{"norm": "linf"}]), "threats[0].eps", "required"),
    (_with(attacks={"preset": "fast"}), "attacks.preset", "'standard'"),
    (_with(attacks={"list": [{"name": "pgd", "stepz": 3}]}), "attacks.list[0].stepz",
     "options: steps"),
    (_with(attacks={"list": ["fgsm", {"name": "pgd", "steps": 0}]}), "attacks.list[1]",
     "positive"),
    (_with(attacks={"list": ["cw"]}), "attacks.list[0].name", "unknown attack"),
    (_with(attacks={"precision": "int8"}), "attacks.precision", "'bf16'"),
    (_with(masking={"enabeld": True}), "masking.enabeld", "did you mean 'enabled'"),
    (_with(masking={"surrogate": "mnist-cnn"}), "masking.surrogate", "trained on 'mnist5k'"),
    (_with(masking={"surrogate": "digits-mpl"}), "masking.surrogate", "unknown zoo model"),
    (_with(attacks={"list": [{"name": "eot"}]}), "attacks.list[0].attack",
     "eot wraps a gradient attack: give attack = one of apgd"),
    (_with(attacks={"list": [{"name": "bpda", "attack": "square"}]}), "attacks.list[0].attack",
     "got 'square'; expected one of"),
    (_with(attacks={"list": [{"name": "eot", "attack": "apgd", "sample": 4}]}),
     "attacks.list[0].sample", "options: samples, eval_draws, steps"),
    (_with(attacks={"list": [{"name": "bpda", "attack": "pgd", "sample": 4}]}),
     "attacks.list[0].sample", "options: approximations, steps"),
    (_with(attacks={"list": [{"name": "eot", "attack": "pgd", "samples": 0}]}),
     "attacks.list[0]", "positive"),
    (_with(attacks={"list": [{"name": "bpda", "attack": "pgd", "steps": 0}]}),
     "attacks.list[0]", "positive"),
    (_with(explain={"metrics": ["faithfulness"]}), "explain.metrics[0]", "deletion_insertion"),
    (_with(backdoor={"models": ["mnist-cnn"]}), "backdoor.models[0]", "not one of"),
    (_with(quick={"n": -1}), "quick.n", ">= 1"),
    (_with(certify={"methods": ["ibp", "alpha-crown"]}), "certify.methods[1]", "'milp'"),
    (_with(certify={"methods": ["ibp", "ibp"]}), "certify.methods", "twice"),
    (_with(certify={"methods": []}), "certify.methods", "is empty"),
    (_with(certify={"time_limit": 0}), "certify.time_limit", "seconds > 0"),
    (_with(certify={"time_limit": "10s"}), "certify.time_limit", "seconds > 0"),
    (_with(certify={"n": 0}), "certify.n", ">= 1"),
    (_with(certify={"timelimit": 5}), "certify.timelimit", "did you mean 'time_limit'"),
    (_with(quick={"models": ["mnist-cnn"]}), "quick.models[0]", "not one of"),
])
def test_validation_names_the_offending_key(doc, key, words):
    with pytest.raises(SuiteError) as err:
        parse_suite(doc, source="s.toml")
    assert err.value.key == key
    assert str(err.value).startswith(f"s.toml: {key}: ")
    assert words in str(err.value)


def test_toml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nmodels = [\n")
    with pytest.raises(SuiteError, match="not valid TOML"):
        load_suite(bad)
    with pytest.raises(FileNotFoundError):
        load_suite(tmp_path / "nope.toml")


def test_suite_is_data_not_code(tmp_path):
    # A module:function model is imported only when the suite runs, never on load.
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent("""
        name = "u"
        dataset = "digits"
        models = ["os:system"]
        [[threats]]
        norm = "linf"
        eps = 0.1
    """))
    suite = load_suite(path)
    assert suite.models[0].is_user


def test_default_suite_ships_and_round_trips():
    suite = load_suite(None)
    assert suite.name == "default" and suite.dataset == "mnist5k"
    assert "mnist-cnn" in [m.key for m in suite.models]
    assert suite.attacks.preset == "standard" and suite.masking.follow_up
    assert suite.explain.enabled and suite.backdoor.enabled
    assert {m.key for m in suite.models if m.optional} >= {"mnist-cnn-pgdat", "mnist-cnn-badnets"}
    assert suite.certify.enabled and "milp" in suite.certify.methods
    assert "mnist-mlp-ibp03" in [m.key for m in suite.models]  # the model whose bracket closes
    assert load_suite("default").to_dict() == suite.to_dict()
    quick = suite.quick()
    assert quick.is_quick and quick.n <= 100 and quick.attacks.preset == "quick"
    assert quick.masking.fast and not quick.masking.follow_up
    assert quick.config_hash() != suite.config_hash()
    for s in (suite, quick):
        assert parse_suite(s.to_dict()).to_dict() == s.to_dict()


def test_attack_precision_key_builds_the_ensemble_and_keeps_fp32_hashes():
    fp32 = parse_suite(_with())
    bf16 = parse_suite(_with(attacks={"preset": "quick", "precision": "bf16"}))
    assert fp32.attacks.precision == "fp32" and "precision" not in fp32.to_dict()["attacks"]
    assert bf16.to_dict()["attacks"]["precision"] == "bf16"
    assert parse_suite(bf16.to_dict()).to_dict() == bf16.to_dict()
    assert bf16.quick().attacks.precision == "bf16"
    assert bf16.build_attacks("linf", 0.1).precision.value == "bf16"
    assert fp32.build_attacks("linf", 0.1).precision.value == "fp32"
    assert parse_suite(_with(attacks={"preset": "quick", "precision": "fp32"})).config_hash() == \
        parse_suite(_with(attacks={"preset": "quick"})).config_hash()


def test_certify_section_parses_round_trips_and_keeps_old_hashes():
    off = parse_suite(_with())
    assert not off.certify.enabled and "certify" not in off.to_dict()
    on = parse_suite(_with(certify={"methods": ["crown", "milp"], "time_limit": 3, "n": 20}))
    c = on.certify
    assert c.enabled and c.methods == ("crown", "milp") and c.time_limit == 3.0 and c.n == 20
    assert on.to_dict()["certify"] == {"enabled": True, "methods": ["crown", "milp"],
                                       "time_limit": 3.0, "n": 20}
    assert parse_suite(on.to_dict()).to_dict() == on.to_dict()
    assert on.config_hash() != off.config_hash()
    # like [explain]: an empty table is off, any key turns it on, enabled = false turns it off
    assert parse_suite(_with(certify={})).certify.enabled is False
    assert parse_suite(_with(certify={"n": 5})).certify.methods == ("ibp", "crown", "milp")
    assert not parse_suite(_with(certify={"enabled": False, "n": 5})).certify.enabled
    quick = on.quick()
    assert quick.certify.enabled and quick.certify.time_limit == 2.0
    assert parse_suite(_with(certify={"time_limit": 1})).quick().certify.time_limit == 1.0


def test_batch_seed_depends_on_seed_and_batch_only():
    assert batch_seed(0, 1) == batch_seed(0, 1)
    assert len({batch_seed(s, b) for s in range(3) for b in range(5)}) == 15
    assert 0 <= batch_seed(7, 3) < 2 ** 63


def test_run_records_unavailable_sections(tmp_path, zoo_cache):
    suite = load_suite(tiny_suite(tmp_path / "s.toml",
                                  models='"digits-mlp", { name = "digits-nope", optional = true }',
                                  masking=True,
                                  extra='[explain]\nmethods = ["saliency"]\n'
                                        'metrics = ["deletion_insertion", "trigger_localisation"]'
                                        '\nn = 8\n[backdoor]\nmodels = ["digits-mlp"]\n'))
    summary = run_suite(suite, store=tmp_path / "r.sqlite", progress=False)
    assert summary.status == "finished"
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        sections = {(r["model"], r["section"]): r for r in st.rows("sections", summary.run_id)}
        assert sections[("digits-nope", "model")]["status"] == "unavailable"
        assert "not registered" in sections[("digits-nope", "model")]["reason"]
        # digits-mlp is not backdoored: asked for, so recorded, not dropped
        assert sections[("digits-mlp", "backdoor")]["status"] == "unavailable"
        masking = st.rows("masking", summary.run_id)
        missing_masking = [r for r in st.rows("sections", summary.run_id)
                           if r["section"] == "masking"]
        assert len(masking) + len(missing_masking) == 2  # one per threat, run or explained
        for m in masking:
            assert m["verdict"] in ("clean", "suspicious", "masked")
        metrics = {(e["method"], e["metric"]) for e in st.rows("explanations", summary.run_id)}
        assert ("saliency", "deletion_auc") in metrics
        cells = st.rows("cells", summary.run_id)
        assert {c["attack"] for c in cells} == {"fgsm", "pgd", "worst-case"}
        for c in cells:
            assert c["ci_low"] <= c["robust_accuracy"] <= c["ci_high"]
            assert c["robust"] <= c["clean_correct"] <= c["n"] == 48


def test_resume_after_interruption_gives_the_same_table(tmp_path, zoo_cache, monkeypatch):
    from unmask.attacks.pgd import PGD

    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    store = tmp_path / "r.sqlite"
    full = run_suite(suite, store=store, progress=False)

    real = PGD._attack
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the first batch of the second cell (3 batches per cell)
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PGD, "_attack", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, store=store, progress=False)
    monkeypatch.setattr(PGD, "_attack", real)
    with Store(store, readonly=True) as st:
        interrupted = st.latest_run()
        assert interrupted.status == "interrupted"
        assert st.finished_units(interrupted.run_id) == {"attack/digits-mlp/linf:0.05"}
    resumed = run_suite(store=store, resume=interrupted.run_id, progress=False)
    assert resumed.run_id == interrupted.run_id and resumed.status == "finished"
    assert resumed.units_skipped == 1 and resumed.units_run == 1
    with Store(store, readonly=True) as st:
        assert cell_table(st, resumed.run_id) == cell_table(st, full.run_id)
        assert sample_table(st, resumed.run_id) == sample_table(st, full.run_id)
        assert st.run(resumed.run_id).status == "finished"


def test_torchrun_two_gloo_processes_give_the_single_process_table(tmp_path, zoo_cache):
    path = tiny_suite(tmp_path / "s.toml")
    store = tmp_path / "r.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNMASK_CACHE": zoo_cache,
           "UNMASK_DEVICE": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    single = subprocess.run([sys.executable, "-m", "unmask.bench", "run", str(path),
                             "--store", str(store), "--no-progress"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "unmask.bench", "run", str(path),
                           "--store", str(store), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stdout[-3000:] + dist.stderr[-3000:]
    with Store(store, readonly=True) as st:
        runs = st.runs()
        assert [r.world_size for r in runs] == [1, 2]
        assert [r.status for r in runs] == ["finished", "finished"]
        assert cell_table(st, runs[1].run_id) == cell_table(st, runs[0].run_id)
        assert sample_table(st, runs[1].run_id) == sample_table(st, runs[0].run_id)


def test_sigint_then_resume_gives_the_same_table(tmp_path, zoo_cache):
    import signal

    path = tiny_suite(tmp_path / "s.toml")
    store = tmp_path / "r.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNMASK_CACHE": zoo_cache,
           "UNMASK_DEVICE": "cpu"}
    # Slow cells (PGD with many restarts) so the signal lands while the second one runs.
    # Radii too small to break any sample, so PGD cannot stop early: at the default 0.05 and
    # 0.1 it broke every sample in a few steps and the run could finish before the signal.
    slow = tmp_path / "slow.toml"
    slow.write_text(path.read_text().replace('preset = "quick"\n\n',
                                             'list = ["fgsm", { name = "pgd", steps = 300, '
                                             'restarts = 10 }]\n\n', 1)
                    .replace("eps = [0.05, 0.1]", "eps = [0.002, 0.004]", 1))
    assert "eps = [0.002, 0.004]" in slow.read_text()
    # -v logs "saved <unit>" as each cell is committed: the signal follows the first one.
    # (Polling the store from here missed it on CI: the run could end before the poll saw a
    # finished cell.)
    # SIGINT back to its default in the child: a test run started in the background (nohup,
    # `&` from a script) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt, so the run finished with exit 0.
    proc = subprocess.Popen([sys.executable, "-m", "unmask.bench", "-v", "run", str(slow),
                             "--store", str(store), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "saved attack/" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, f"exit status {proc.returncode}: {err[-3000:]}"
    # The message names the run to resume (it printed a literal <RUN_ID> before).
    assert f"unmask run --resume 1 --store {store}" in err and "<RUN_ID>" not in err
    with Store(store, readonly=True) as st:
        run = st.run(1)
        assert run.status == "interrupted"
        done = st.finished_units(1)
    assert 1 <= len(done) < 2
    resumed = subprocess.run([sys.executable, "-m", "unmask.bench", "run", "--resume", "1",
                              "--store", str(store), "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 skipped" in resumed.stdout
    full = subprocess.run([sys.executable, "-m", "unmask.bench", "run", str(slow), "--store",
                           str(store), "--no-progress"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    with Store(store, readonly=True) as st:
        assert st.run(1).status == "finished"
        assert cell_table(st, 1) == cell_table(st, 2)
        assert sample_table(st, 1) == sample_table(st, 2)


def test_channels_last_gives_the_same_table(tmp_path, mnist_cnn):
    """channels_last changes the layout of a conv model's weights, not the numbers: the same
    samples break (counts may differ only where rounding flips a sample at the boundary)."""
    tables = []
    for cl in (False, True):
        path = tmp_path / f"cl{cl}.toml"
        path.write_text(textwrap.dedent(f"""
            name = "cl"
            dataset = "mnist5k"
            n = 64
            batch_size = 32
            channels_last = {str(cl).lower()}
            models = ["mnist-cnn"]
            [[threats]]
            norm = "linf"
            eps = [0.1]
            [attacks]
            preset = "quick"
            [masking]
            enabled = false
            [explain]
            enabled = false
            [backdoor]
            enabled = false
            """))
        suite = load_suite(path)
        assert suite.channels_last is cl
        summary = run_suite(suite, store=tmp_path / f"cl{cl}.sqlite", progress=False)
        with Store(tmp_path / f"cl{cl}.sqlite", readonly=True) as st:
            tables.append({(r["attack"]): (r["clean_correct"], r["robust"])
                           for r in st.rows("cells", summary.run_id)})
    assert tables[0].keys() == tables[1].keys() == {"fgsm", "pgd", "worst-case"}
    for attack, (clean, robust) in tables[0].items():
        clean_cl, robust_cl = tables[1][attack]
        assert clean_cl == clean and abs(robust_cl - robust) <= 1, attack
    # the checkpoint's own layout is untouched for the next user of the zoo model
    assert all(p.is_contiguous() for p in mnist_cnn.parameters())


@pytest.fixture
def user_models(tmp_path):
    """tmp_path on sys.path with the broken user models of suite_helpers importable."""
    (tmp_path / "brokenmod.py").write_text(BROKEN_MODULE)
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m == "brokenmod"]:
        del sys.modules[name]


def _sections(st, run_id):
    return {(r["model"], r["section"], r["detail"]): (r["status"], r["reason"])
            for r in st.rows("sections", run_id)}


def test_one_broken_model_never_stops_a_run(tmp_path, zoo_cache, user_models):
    from unmask.bench.report import leaderboard as lb

    models = ('"digits-mlp", { name = "brokenmod:raises", label = "raises" }, '
              '{ name = "brokenmod:wrong_shape", label = "shape" }, '
              '{ name = "brokenmod:nan_logits", label = "nan" }, '
              '{ name = "brokenmod:fails_later", label = "later" }')
    suite = load_suite(tiny_suite(tmp_path / "s.toml", models=models))
    store = tmp_path / "r.sqlite"
    summary = run_suite(suite, store=store, progress=False)
    assert summary.status == "finished"
    with Store(store, readonly=True) as st:
        sections = _sections(st, summary.run_id)
        cells = {(c["model"], c["eps"]) for c in st.rows("cells", summary.run_id)}
        df = lb.leaderboard_frame(st, summary.run_id)
        before = cell_table(st, summary.run_id)
    assert cells == {("digits-mlp", 0.05), ("digits-mlp", 0.1)}  # the good model finished
    status, reason = sections[("raises", "model", "")]
    assert status == "error" and reason == "RuntimeError: cannot build this model"
    assert "returned (16, 1, 3)" in sections[("shape", "model", "")][1]
    assert "non-finite logits" in sections[("nan", "model", "")][1]
    assert "100.0%" in sections[("nan", "model", "")][1]
    for eps in ("0.05", "0.1"):  # this one fails inside the attacks, per cell
        assert sections[("later", "attack", f"linf:{eps}")][1].startswith(
            "RuntimeError: forward failed on call")
    # every broken model has its rows, each saying the error, none ranked
    bad = df[df["model"] != "digits-mlp"]
    assert len(bad) == 8 and bad["rank"].isna().all()
    assert (bad["status"].str.startswith("error: ")).all()
    assert set(bad.loc[bad["model"] == "raises", "status"]) == \
        {"error: RuntimeError: cannot build this model"}

    # --resume drops the broken models (--skip); nothing stored is lost or rerun
    keep = ["raises", "shape", "nan", "later"]
    resumed = run_suite(store=store, resume=summary.run_id, skip=keep[1:], progress=False)
    assert resumed.units_run == 0  # 'raises' is tried again and fails again
    with Store(store, readonly=True) as st:
        assert cell_table(st, summary.run_id) == before
        df = lb.leaderboard_frame(st, summary.run_id)
        assert set(df["model"]) == {"digits-mlp", "raises"}
        assert [m["label"] for m in st.run(summary.run_id).config["models"][1:]] == ["raises"]
    with pytest.raises(ValueError, match="not a model of the run"):
        run_suite(store=store, resume=summary.run_id, skip=["nope"], progress=False)

    # an edited suite replaces the broken model under the same key; the good one is kept
    fixed = load_suite(tiny_suite(tmp_path / "fixed.toml", models=(
        '"digits-mlp", { name = "brokenmod:good", label = "raises" }')))
    resumed = run_suite(fixed, store=store, resume=summary.run_id, progress=False)
    assert resumed.status == "finished" and resumed.units_run == 2
    assert resumed.units_skipped == 2  # digits-mlp's two cells
    with Store(store, readonly=True) as st:
        # the error is gone with its cause; the dropped models' stay in the store, off the page
        assert {k[0] for k in _sections(st, summary.run_id)} == {"shape", "nan", "later"}
        assert lb.sections_frame(st, summary.run_id).empty
        df = lb.leaderboard_frame(st, summary.run_id)
        assert (df["status"] == "ok").all() and len(df) == 4
        assert [r for r in cell_table(st, summary.run_id) if r[0] == "digits-mlp"] == \
            [r for r in before if r[0] == "digits-mlp"]
    changed = load_suite(tiny_suite(tmp_path / "changed.toml", models='"digits-mlp"'))
    changed = __import__("dataclasses").replace(changed, n=40)
    with pytest.raises(ValueError, match="changes n"):
        run_suite(changed, store=store, resume=summary.run_id, progress=False)


def test_cli_resume_skip(tmp_path, zoo_cache, user_models, capsys):
    from unmask.bench.cli.main import main

    path = tiny_suite(tmp_path / "s.toml", models=(
        '"digits-mlp", { name = "brokenmod:raises", label = "raises" }'))
    store = str(tmp_path / "r.sqlite")
    assert main(["run", str(path), "--store", store, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "error: raises model: RuntimeError: cannot build this model" in out
    assert main(["run", "--resume", "1", "--skip", "raises", "--store", store,
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "raises" not in out and "2 skipped" in out
    assert main(["run", "--skip", "raises", "--store", store]) == 2
    assert "--resume" in capsys.readouterr().err
    # an edited suite that replaces the broken model under its key
    fixed = tiny_suite(tmp_path / "fixed.toml", models=(
        '"digits-mlp", { name = "brokenmod:good", label = "raises" }'))
    assert main(["run", str(fixed), "--resume", "1", "--store", store, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 units run, 2 skipped" in out and "error:" not in out
    changed = tmp_path / "changed.toml"
    changed.write_text(fixed.read_text().replace("seed = 0", "seed = 1"))
    assert main(["run", str(changed), "--resume", "1", "--store", store]) == 2
    assert "the edited suite changes seed" in capsys.readouterr().err


def test_non_finite_margins_make_the_cell_an_error():
    import torch

    from unmask.bench.suite.records import BatchOutcome
    from unmask.bench.suite.runner import merge_cell

    part = BatchOutcome.from_dict({
        "b": 0, "robust": [True, False], "clean_correct": [True, True],
        "broken_by": [None, "pgd"], "margin": [0.5, float("nan")],
        "costs": {"pgd": {"attacked": 2, "broken": 1, "forwards": 2, "backwards": 2,
                          "seconds": 0.0}}, "stochastic": False, "draws": None,
        "seconds": 0.0})
    with pytest.raises(ValueError, match="non-finite logits .* for 1 of 2 samples"):
        merge_cell([part], ["pgd"], torch.tensor([0, 1]), model="m", norm="linf", eps=0.1,
                   sha256=None, source="user")
    part = dataclasses.replace(part, margin=(0.5, -0.1))
    cells, _ = merge_cell([part], ["pgd"], torch.tensor([0, 1]), model="m", norm="linf",
                          eps=0.1, sha256=None, source="user")
    assert cells[-1]["robust_accuracy"] == 0.5


def test_one_definition_for_randomised_models(tmp_path, zoo_cache, user_models):
    """The ensemble, the suite runner, the pytest helper and the leaderboard report the same
    robust accuracy of a randomised model: the share of samples correct on a strict majority
    of DRAWS fresh draws (robust_by_majority), with the Wilson interval over samples."""
    import torch
    from brokenmod import noisy

    from unmask.attacks import Ensemble
    from unmask.bench import Threat, data
    from unmask.bench.core import DRAWS, make_generator, robust_by_majority
    from unmask.bench.report import leaderboard as lb
    from unmask.bench.report.testing import assert_robust_accuracy
    from unmask.bench.suite.store import wilson

    path = tiny_suite(tmp_path / "s.toml", models='{ name = "brokenmod:noisy", label = "noisy" }')
    path.write_text(path.read_text().replace("eps = [0.05, 0.1]", "eps = [0.1]"))
    suite = load_suite(path)
    assert suite.attacks.draws == DRAWS
    summary = run_suite(suite, store=tmp_path / "r.sqlite", progress=False)
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        worst = next(c for c in st.rows("cells", summary.run_id) if c["attack"] == "worst-case")
        row = lb.leaderboard_frame(st, summary.run_id).iloc[0]
        md = lb.render(st, summary.run_id, "md")
    assert worst["stochastic"] == 1

    threat = Threat("linf", 0.1)
    x, y = data.load("digits", "test", n=48)
    model = noisy()
    ensemble = Ensemble.preset("quick", threat)
    assert ensemble.draws == DRAWS
    robust = []
    for b, start in enumerate(range(0, 48, 16)):
        res = ensemble(model, x[start:start + 16], y[start:start + 16],
                       generator=make_generator(batch_seed(0, b)))
        assert res.stochastic
        # per sample: robust iff the best candidate fooled fewer than half the draws
        assert torch.equal(res.robust, robust_by_majority(res.success_rate))
        assert res.robust_accuracy == float(res.robust.float().mean())
        robust.append(res.robust)
    n_robust = int(torch.cat(robust).sum())
    helper = assert_robust_accuracy(noisy(), (x, y), threat, "quick", at_least=0.0, n=48,
                                    batch_size=16, seed=0, diagnose=False)
    assert 0 < n_robust < 48  # a real test: some samples broken, some not
    assert worst["robust"] == n_robust
    assert worst["robust_accuracy"] == helper.robust_accuracy == row["robust_accuracy"] \
        == n_robust / 48
    assert (worst["ci_low"], worst["ci_high"]) == (helper.ci_low, helper.ci_high) == \
        (row["ci_low"], row["ci_high"]) == wilson(n_robust, 48)
    assert f"robust on a majority of {DRAWS} draws" in md
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "robust_by_majority" in readme and f"{DRAWS} fresh draws" in readme


def test_suites_list_eot_and_bpda(tmp_path, zoo_cache, user_models):
    from unmask.attacks import BPDA, EOT

    path = tiny_suite(tmp_path / "s.toml", models=(
        '"digits-mlp", { name = "brokenmod:quantized", label = "quantized" }'))
    path.write_text(path.read_text().replace(
        'preset = "quick"', 'list = ["fgsm", { name = "eot", attack = "apgd", samples = 2, '
        'steps = 5 }, { name = "bpda", attack = "pgd", steps = 7 }]').replace(
        "eps = [0.05, 0.1]", "eps = [0.1]"))
    suite = load_suite(path)
    assert parse_suite(suite.to_dict()).to_dict() == suite.to_dict()
    ensemble = suite.build_attacks("linf", 0.1)
    fgsm, eot, bpda = ensemble.attacks
    assert isinstance(eot, EOT) and eot.samples == 2 and eot.attack.steps == 5
    assert isinstance(bpda, BPDA) and bpda.attack.steps == 7
    summary = run_suite(suite, store=tmp_path / "r.sqlite", progress=False)
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        # BPDA approximates the quantisation; on a model with nothing to approximate it is
        # that cell's error, with BPDA's message
        assert [c["attack"] for c in st.rows("cells", summary.run_id)] == \
            ["fgsm", "eot-apgd-ce", "bpda-pgd", "worst-case"]
        assert {c["model"] for c in st.rows("cells", summary.run_id)} == {"quantized"}
        (section,) = st.rows("sections", summary.run_id)
    assert (section["model"], section["section"], section["status"]) == \
        ("digits-mlp", "attack", "error")
    assert section["reason"].startswith("ValueError: BPDA found no preprocessing module")


def _transfer_check(store, run_id, model):
    from unmask.bench.report import frames

    with Store(store, readonly=True) as st:
        row = next(m for m in st.rows("masking", run_id) if m["model"] == model)
    report = frames._parse_report(row)
    assert stored_masking_report(row) == report  # with its schema versions
    return next(c for c in report.checks if "transfer" in c.name)


def test_the_transfer_check_runs_in_suites_with_a_named_surrogate(tmp_path, zoo_cache,
                                                                    user_models, monkeypatch):
    from unmask.bench.suite import runner
    from unmask.bench.suite.spec import default_surrogate

    assert default_surrogate("digits") == "digits-mlp"
    assert default_surrogate("mnist5k") == "mnist-cnn"
    seen = {}
    real = runner.diagnose

    def spy(model, *args, surrogate=None, **kwargs):
        seen[id(model)] = surrogate
        return real(model, *args, surrogate=surrogate, **kwargs)

    monkeypatch.setattr(runner, "diagnose", spy)
    models = '"digits-mlp", { name = "brokenmod:good", label = "wrapped" }'
    path = tiny_suite(tmp_path / "s.toml", models=models, masking=True)
    path.write_text(path.read_text().replace("eps = [0.05, 0.1]", "eps = [0.1]"))
    suite = load_suite(path)
    assert suite.masking.surrogate == "auto" and "surrogate" not in suite.to_dict()["masking"]
    store = tmp_path / "r.sqlite"
    summary = run_suite(suite, store=store, progress=False)
    assert sorted(s is None for s in seen.values()) == [False, True]
    # the surrogate is the default zoo model of the dataset; the evidence names it
    wrapped = _transfer_check(store, summary.run_id, "wrapped")
    assert wrapped.evidence["surrogate"] == "digits-mlp" and wrapped.skipped is None
    assert wrapped.value is not None
    # digits-mlp IS the surrogate: the check says so instead of attacking itself twice
    itself = _transfer_check(store, summary.run_id, "digits-mlp")
    assert "the model is the surrogate (digits-mlp)" in itself.skipped

    off = tmp_path / "off.toml"
    off.write_text(path.read_text().replace("n = 24", 'n = 24\nsurrogate = "none"'))
    suite = load_suite(off)
    assert suite.masking.surrogate == "none"
    seen.clear()
    summary = run_suite(suite, store=store, progress=False)
    assert list(seen.values()) == [None, None]
    assert "surrogate = 'none'" in _transfer_check(store, summary.run_id, "wrapped").skipped


def test_resume_between_attacks_and_diagnosis_gives_the_same_leaderboard(tmp_path, zoo_cache,
                                                                        monkeypatch):
    """The merged number is computed from the stored per-sample outcomes at read time: a run
    interrupted before its second diagnosis shows that row unranked (the diagnosis did not
    finish) and, resumed, gives the uninterrupted run's table."""
    from unmask.bench.report import leaderboard as lb
    from unmask.bench.suite import runner

    suite = load_suite(tiny_suite(tmp_path / "s.toml", masking=True))
    store = tmp_path / "r.sqlite"
    full = run_suite(suite, store=store, progress=False)
    real = runner.diagnose
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "diagnose", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, store=store, progress=False)
    monkeypatch.undo()
    drop = ["runtime_s"]
    with Store(store, readonly=True) as st:
        run_id = st.latest_run().run_id
        df = lb.leaderboard_frame(st, run_id).set_index("threat")
    assert df.loc["linf:0.05", "rank"] == 1 and pd_isna(df.loc["linf:0.1", "rank"])
    assert "did not finish (run interrupted)" in df.loc["linf:0.1", "rank_note"]
    run_suite(store=store, resume=run_id, progress=False)
    with Store(store, readonly=True) as st:
        a = lb.leaderboard_frame(st, full.run_id).drop(columns=drop)
        b = lb.leaderboard_frame(st, run_id).drop(columns=drop)
    assert a.equals(b)


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
