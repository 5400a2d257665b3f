"""Bring your own model (issue #18): every single-model command on a ``module:function``
builder and on a checkpoint file, ``--check-only`` that builds and probes user models, input
validation, and the small CLI fixes (Ctrl-C's run id, resume of a missing store, wall time
without the pause, one warning per diagnosis, enums printed as their values, no ``%%``)."""

from __future__ import annotations

import json
import os
import textwrap
import warnings

import pytest
import torch
from torch import nn

from unmask.bench import data
from unmask.bench.cli.main import build_parser, main
from unmask.bench.core import LargeEpsWarning, ProbabilityOutputWarning, Threat
from unmask.bench.zoo.resolve import ModelSourceError, load_model

PKG = "byom_models_pkg"  # a package only the working directory of these tests holds

NETS = '''
import torch
from torch import nn


class Rounded(nn.Module):
    """A user's input-rounding defense, written outside the package."""

    def __init__(self, net, levels=4):
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x):
        return self.net(torch.round(x * (self.levels - 1)) / (self.levels - 1))


def net(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def build(width=16, levels=4):
    return Rounded(net(width), levels)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 10))


def broken():
    raise RuntimeError("the builder itself fails")


class _Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


def flat():
    return _Flat()


class _NaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)) * float("nan")


def nan():
    return _NaN()
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project folder: a package of builders and checkpoints of its networks."""
    root = tmp_path_factory.mktemp("project")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "nets.py").write_text(NETS)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.save(mlp.state_dict(), root / "mlp.pt")
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(256, 10))
    from safetensors.torch import save_file

    save_file(cnn.state_dict(), str(root / "cnn.safetensors"))
    # DataParallel-style keys and a {"state_dict": ...} wrapper, as training scripts save them
    torch.save({"state_dict": {f"module.{k}": v for k, v in mlp.state_dict().items()}},
               root / "ddp.ckpt")
    return root


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.chdir(project)
    return project


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# The same model named two ways: a builder of the user's, and a checkpoint with its --arch.
MLP_FORMS = {
    "builder": [f"{PKG}.nets:build", "--model-kwargs", '{"width": 16, "levels": 4}'],
    "checkpoint": ["mlp.pt", "--arch", f"{PKG}.nets:net"],
}
CNN_FORMS = {
    "builder": [f"{PKG}.nets:cnn"],
    "checkpoint": ["cnn.safetensors", "--arch", f"{PKG}.nets:cnn"],
}


@pytest.mark.parametrize("form", sorted(MLP_FORMS))
def test_attack_on_a_user_model(in_project, capsys, form, tmp_path):
    out_json = tmp_path / "r.json"
    code, out, err = _cli(capsys, "attack", *MLP_FORMS[form], "--dataset", "digits",
                          "--eps", "0.1", "--n", "40", "--attack", "pgd", "--steps", "5",
                          "--json", out_json)
    assert code == 0, err
    summary = json.loads(out_json.read_text())
    assert summary["n"] == 40 and 0.0 <= summary["robust_accuracy"] <= summary["clean_accuracy"]
    assert "robust accuracy" in out


@pytest.mark.parametrize("form", sorted(MLP_FORMS))
def test_diagnose_on_a_user_model(in_project, capsys, form, tmp_path):
    code, out, err = _cli(capsys, "diagnose", *MLP_FORMS[form], "--dataset", "digits",
                          "--eps", "0.1", "--n", "32", "--fast", "--checks",
                          "zero gradients,one-step beats iterative", "--json", "-")
    assert code in (0, 3, 4), err  # the verdict's exit status, not a usage error
    report = json.loads(out)
    assert report["n"] == 32
    assert {c["name"] for c in report["checks"]} == {"zero gradients",
                                                     "one-step beats iterative"}


def test_diagnose_finds_the_user_rounding_defense_masked(in_project, capsys):
    # The rounding of the user's builder kills the input gradient: the diagnosis says so.
    code, out, _ = _cli(capsys, "diagnose", f"{PKG}.nets:build", "--dataset", "digits",
                        "--eps", "0.1", "--n", "32", "--fast", "--checks", "zero gradients")
    assert code == 4 and "masked" in out


@pytest.mark.parametrize("form", sorted(MLP_FORMS))
def test_explain_and_gradflow_on_a_user_model(in_project, capsys, form, tmp_path):
    fig = tmp_path / "maps.png"
    code, _, err = _cli(capsys, "explain", *MLP_FORMS[form], "--dataset", "digits", "--n", "2",
                        "--method", "saliency", "--attack-steps", "2", "--out", fig)
    assert code == 0, err
    assert fig.stat().st_size > 0
    report = tmp_path / "flow.json"
    code, out, err = _cli(capsys, "gradflow", *MLP_FORMS[form], "--dataset", "digits",
                          "--n", "8", "--json", report)
    assert code == 0, err
    assert json.loads(report.read_text())["n"] == 8


@pytest.mark.parametrize("form", sorted(MLP_FORMS))
def test_perf_on_a_user_model(in_project, capsys, form, tmp_path):
    code, out, err = _cli(capsys, "perf", *MLP_FORMS[form], "--dataset", "digits", "--n", "16",
                          "--steps", "2", "--queries", "4", "--repeats", "1")
    assert code == 0, err
    assert "pgd-2" in out


@pytest.mark.parametrize("form", sorted(MLP_FORMS))
def test_certify_on_a_user_model(in_project, capsys, form, tmp_path):
    # the plain network (the builder's rounding is not a supported layer: it says so)
    forms = {"builder": [f"{PKG}.nets:net"], "checkpoint": MLP_FORMS["checkpoint"]}
    out_json = tmp_path / "c.json"
    code, out, err = _cli(capsys, "certify", *forms[form], "--dataset", "digits", "--eps",
                          "0.01", "--n", "8", "--methods", "ibp", "crown", "--json", out_json)
    assert code == 0, err
    results = json.loads(out_json.read_text())
    assert [r["method"] for r in results] == ["ibp", "crown"]
    assert results[0]["certified_accuracy"] <= results[1]["certified_accuracy"]


@pytest.mark.parametrize("form", sorted(CNN_FORMS))
def test_backdoor_on_a_user_model(in_project, capsys, form):
    poisoning = '{"trigger": "badnets", "target": 0, "poison_rate": 0.05, "poison_seed": 0}'
    code, out, err = _cli(capsys, "backdoor", *CNN_FORMS[form], "--dataset", "digits",
                          "--backdoor", poisoning, "--reference", "mlp.pt",
                          "--reference-arch", f"{PKG}.nets:net", "--no-defenses", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["poisoned"] == 72 and 0.0 <= metrics["attack_success_rate"] <= 1.0
    assert metrics["reference_accuracy"] is not None
    # Without the poisoning recipe a model of the user's cannot be evaluated: it says so.
    code, _, err = _cli(capsys, "backdoor", *CNN_FORMS[form], "--dataset", "digits")
    assert code == 2 and "--backdoor JSON" in err


def test_checkpoint_forms_load_the_same_weights(in_project):
    x = data.load("digits", "test", n=8)[0]
    plain = load_model("mlp.pt", arch=f"{PKG}.nets:net", dataset="digits").model
    ddp = load_model("ddp.ckpt", arch=f"{PKG}.nets:net", dataset="digits")
    with torch.no_grad():
        torch.testing.assert_close(ddp.model(x), plain(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        torch.jit.save(torch.jit.script(plain), str(in_project / "ts.pt"))
        ts = load_model("ts.pt", dataset="digits")
    assert ts.source == "checkpoint" and ts.details["format"] == "torchscript"
    with torch.no_grad():
        torch.testing.assert_close(ts.model(x), plain(x))


@pytest.mark.parametrize("name, kwargs, message", [
    ("mlp.pt", {}, "--arch"),  # weights without their architecture
    ("missing.pt", {"arch": "mlp"}, "checkpoint not found"),
    (f"{PKG}.nets:nope", {}, "no callable 'nope'"),
    ("no_such_pkg.mod:build", {}, "cannot import"),
    (f"{PKG}.nets:build", {"kwargs": {"depth": 3}}, "unexpected keyword"),
    (f"{PKG}.nets:build", {"arch": "mlp"}, "builds its own model"),
    ("mnist-cnnn", {}, "Did you mean mnist-cnn"),
    ("mlp.pt", {"arch": "small-cnn"}, "does not match"),
])
def test_a_model_name_that_names_no_model_says_what_to_fix(in_project, name, kwargs, message):
    with pytest.raises(ModelSourceError, match=message):
        load_model(name, dataset="digits", **kwargs)


def test_the_working_directory_is_importable_as_with_python_dash_m(in_project, capsys):
    import sys

    sys.modules.pop(f"{PKG}.nets", None)
    sys.modules.pop(PKG, None)
    sys.path[:] = [p for p in sys.path if p not in (str(in_project), "")]
    loaded = load_model(f"{PKG}.nets:build", dataset="digits")
    assert loaded.source == "user" and type(loaded.model).__name__ == "Rounded"


def test_cli_errors_for_bad_input(in_project, capsys):
    base = ["attack", f"{PKG}.nets:build", "--dataset", "digits", "--attack", "fgsm"]
    code, _, err = _cli(capsys, *base, "--n", "5000")
    assert code == 2 and "holds 360 samples" in err
    code, _, err = _cli(capsys, *base, "--eps", "8")
    assert code == 2 and "larger than 1" in err and "8/255" in err
    code, _, err = _cli(capsys, *base, "--norm", "l2", "--eps", "9")  # sqrt(64) = 8
    assert code == 2 and "larger than 8" in err
    code, _, err = _cli(capsys, "attack", f"{PKG}.nets:build", "--n", "4", "--attack", "fgsm")
    assert code == 2 and "is --dataset right?" in err  # an 8x8 model on 28x28 mnist5k
    code, _, err = _cli(capsys, "attack", f"{PKG}.nets:nan", "--dataset", "digits", "--n", "4")
    assert code == 2 and "non-finite" in err


def test_check_only_builds_every_user_model_and_reports_every_problem(in_project, capsys):
    suite = in_project / "mine.toml"
    suite.write_text(textwrap.dedent(f"""
        name = "mine"
        dataset = "digits"
        n = 16
        models = ["{PKG}.nets:build", "{PKG}.nets:broken", "{PKG}.nets:flat", "{PKG}.nets:nan",
                  {{ name = "{PKG}.nets:build", label = "bad-kwargs", kwargs = {{ depth = 2 }} }},
                  "no_such_pkg.mod:build"]
        [[threats]]
        norm = "linf"
        eps = [0.1]
        [attacks]
        preset = "quick"
        [masking]
        enabled = false
    """))
    code, out, err = _cli(capsys, "run", suite, "--check-only")
    assert code == 1
    assert f"{PKG}.nets:build: built and probed" in out
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 5, err
    for what in ("the builder itself fails", "expected logits of shape", "non-finite",
                 "unexpected keyword", "cannot import 'no_such_pkg.mod'"):
        assert any(what in p for p in problems), (what, err)
    good = in_project / "good.toml"
    good.write_text(suite.read_text().replace(
        suite.read_text()[suite.read_text().index("models"):suite.read_text().index("[[")],
        f'models = ["{PKG}.nets:build", "{PKG}.nets:cnn"]\n'))
    code, out, err = _cli(capsys, "run", good, "--check-only")
    assert code == 0, err


# --- input validation ------------------------------------------------------------------------


def _linear(k=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, k)).eval()


@pytest.fixture(scope="module")
def digits_batch():
    return data.load("digits", "test", n=24)


def test_labels_beyond_the_class_count_are_an_error_everywhere(digits_batch):
    from unmask.attacks import PGD, Ensemble
    from unmask.bench.report.testing import assert_robust_accuracy
    from unmask.defenses import diagnose

    x, y = digits_batch
    model = _linear(k=5)  # labels go up to 9
    threat = Threat("linf", 0.1)
    for run in (lambda: Ensemble.preset("quick", threat)(model, x, y),
                lambda: PGD(threat, steps=2)(model, x, y),
                lambda: diagnose(model, x, y, threat, fast=True),
                lambda: assert_robust_accuracy(model, (x, y), threat, at_least=0.0,
                                               diagnose=False)):
        with pytest.raises(ValueError, match="labels go up to class 9 but the model returns 5"):
            run()


def test_float64_images_give_the_float32_result(digits_batch):
    from unmask.attacks import Ensemble

    x, y = digits_batch
    model = _linear()
    ens = Ensemble.preset("quick", Threat("linf", 0.1))
    r32, r64 = ens(model, x, y, generator=0), ens(model, x.double(), y, generator=0)
    assert r32.robust_accuracy == r64.robust_accuracy
    assert r64.x_adv.dtype == torch.float32
    with pytest.raises(TypeError, match=r"x.float\(\) / 255"):
        ens(model, (x * 255).to(torch.uint8), y)


def test_eps_is_judged_against_the_input_box():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="larger than 1"):
        Threat("linf", 1.5)
    assert Threat("linf", 0.3).scaled(4.0).eps == 1.0  # capped at the diameter
    with pytest.raises(ValueError, match="larger than 8"):
        Threat("l2", 8.5).check_for(x)
    with pytest.warns(LargeEpsWarning):
        Threat("linf", 0.5).check_for(x)
    with pytest.warns(LargeEpsWarning):
        Threat("l2", 4.0).check_for(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Threat("linf", 0.3).check_for(x)
        Threat("l2", 3.9).check_for(x)


def test_n_larger_than_the_data_is_an_error(digits_batch):
    from unmask.bench.report.testing import assert_robust_accuracy

    with pytest.raises(ValueError, match="holds 360 samples"):
        data.load("digits", "test", n=361)
    assert len(data.load("digits", "test", n=360)[1]) == 360
    x, y = digits_batch
    with pytest.raises(ValueError, match="holds 24 samples"):
        assert_robust_accuracy(_linear(), (x, y), Threat("linf", 0.1), at_least=0.0, n=25,
                               diagnose=False)


# --- the small CLI issues ----------------------------------------------------------------------


def test_no_help_text_shows_a_doubled_percent_sign(capsys):
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subs.choices.items():
        text = sub.format_help()
        assert "%%" not in text, name
    assert {"run", "check", "attack", "diagnose", "leaderboard"} <= set(subs.choices)


def test_verdicts_and_other_enums_print_as_their_values():
    from unmask.bench.core import Norm
    from unmask.defenses.masking import MaskingKind, Verdict

    assert f"{Verdict.CLEAN}" == str(Verdict.CLEAN) == "clean"
    assert f"{Verdict.MASKED:>8}" == "  masked"
    assert str(Norm.LINF) == "linf" and str(MaskingKind.SHATTERED) == MaskingKind.SHATTERED.value


def test_resume_of_a_missing_store_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "missing.sqlite"
    code, _, err = _cli(capsys, "run", "--resume", "1", "--store", missing)
    assert code == 2 and "no results store" in err
    assert not missing.exists()


def test_wall_time_excludes_the_pause_before_a_resume(tmp_path, monkeypatch):
    from unmask.bench.suite import store as store_mod

    clock = [1000.0]
    monkeypatch.setattr(store_mod.time, "time", lambda: clock[0])
    with store_mod.Store(tmp_path / "s.sqlite") as st:
        run_id = st.start_run(suite="s", config={}, config_hash="h", seed=0, quick=False,
                              git_commit=None, versions={}, device="cpu", world_size=1,
                              host=None)
        clock[0] += 30.0  # ran 30 s, then Ctrl-C
        st.set_status(run_id, "interrupted")
        clock[0] += 3600.0  # an hour later: --resume
        st.reopen_run(run_id, device="cpu", world_size=1)
        clock[0] += 10.0  # ran 10 s more
        st.set_status(run_id, "finished")
        run = st.run(run_id)
    assert run.paused == pytest.approx(3600.0)
    assert run.wall_seconds == pytest.approx(40.0)


def test_a_diagnosis_warns_about_probability_outputs_once():
    from unmask.defenses import diagnose

    x, y = data.load("digits", "test", n=24)
    model = nn.Sequential(_linear(), nn.Softmax(dim=1)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagnose(model, x, y, Threat("linf", 0.1), fast=True,
                 checks=["zero gradients", "one-step beats iterative", "monotone in eps"])
    probs = [w for w in caught if issubclass(w.category, ProbabilityOutputWarning)]
    assert len(probs) == 1, [str(w.message)[:60] for w in probs]


def test_attack_on_a_robustbench_style_checkpoint(in_project, capsys, tmp_path):
    from unmask.bench.zoo.archs import MLP

    torch.manual_seed(0)
    mlp = MLP(in_features=64, hidden=16, num_classes=10)
    path = tmp_path / "rb" / "digits" / "Linf" / "Mine2026.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": mlp.state_dict()}, path)
    out_json = tmp_path / "r.json"
    kwargs = json.dumps({"model_dir": str(tmp_path / "rb"),
                         "arch_kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}})
    code, out, err = _cli(capsys, "attack", "robustbench:digits/Linf/Mine2026", "--arch", "mlp",
                          "--model-kwargs", kwargs, "--eps", "0.1", "--n", "16", "--attack",
                          "fgsm", "--json", out_json)
    assert code == 0, err
    assert "evaluated on digits" in err  # the spec's dataset, registered here
    x, y = data.load("digits", "test", n=16)
    with torch.no_grad():
        clean = float((mlp.eval()(x).argmax(1) == y).float().mean())
    assert json.loads(out_json.read_text())["clean_accuracy"] == pytest.approx(clean)
    code, _, err = _cli(capsys, "attack", "robustbench:digits/Linf/Missing", "--arch", "mlp",
                        "--model-kwargs", kwargs)
    assert code == 2 and "Missing.pt" in err


def test_the_run_commit_is_dirty_only_when_code_changed(tmp_path):
    import shutil
    import subprocess

    from unmask.bench.suite.runner import git_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "pkg" / "m.py").write_text("x = 1\n")
    (repo / "README.md").write_text("numbers\n")
    (repo / "results" / "leaderboard.md").write_text("| a |\n")

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                            "HOME": str(tmp_path), "PATH": os.environ["PATH"]})

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    clean = git_commit(repo / "pkg")
    assert clean is not None and not clean.endswith("+dirty")
    # Regenerating results and the README's numbers: still the commit that ran.
    (repo / "results" / "leaderboard.md").write_text("| b |\n")
    (repo / "README.md").write_text("new numbers\n")
    assert git_commit(repo / "pkg") == clean
    (repo / "pkg" / "m.py").write_text("x = 2\n")
    assert git_commit(repo / "pkg") == clean + "+dirty"
