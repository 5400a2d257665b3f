"""The comparison against the official AutoAttack: one judge for every method's points, pass
counts from the same counting wrapper on both sides, curves that end where the counters do."""

import json

import pytest
import torch

from unmask.bench import Threat
from unmask.bench.perf.autoattack import (
    OFFICIAL,
    compare,
    robust_accuracy,
    run_official,
    run_preset,
)

pytest.importorskip("pyautoattack", reason="the official AutoAttack is a dev extra")


@pytest.fixture(scope="module")
def digits(digits_mlp, digits_test):
    return digits_mlp.eval(), digits_test[0][:16], digits_test[1][:16]


def test_the_judge_counts_a_point_outside_the_ball_as_robust(digits):
    model, x, y = digits
    threat = Threat("linf", 0.1)
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    acc, robust = robust_accuracy(model, x, y, x.clone(), threat)
    assert acc == pytest.approx(float((~wrong).float().mean()))
    far = (x + 0.5).clamp(0, 1)  # outside the ball: never a break, whatever the model says
    acc_far, robust_far = robust_accuracy(model, x, y, far, threat)
    assert bool(robust_far[~threat.contains(far, x)].all())
    with pytest.raises(ValueError, match="shape"):
        robust_accuracy(model, x, y, x[:3], threat)


def test_preset_run_counts_and_curve(digits):
    model, x, y = digits
    run = run_preset(model, x, y, Threat("linf", 0.1), "quick")
    assert run.stages == ["clean", "fgsm", "pgd"]
    # The curve's last point is exactly the passes the counting wrapper saw.
    assert run.curve[-1][0] == pytest.approx((run.forwards + run.backwards) / len(y))
    acc, _ = robust_accuracy(model, x, y, run.x_adv, Threat("linf", 0.1))
    assert run.curve[-1][1] == pytest.approx(acc)
    assert all(a >= b for (_, a), (_, b) in zip(run.curve, run.curve[1:]))  # never rises


# At eps 0.3 APGD-CE breaks every digit and AutoAttack skips the rest: seconds, not minutes.
BIG = Threat("linf", 0.3)


def test_official_run_is_counted_and_its_curve_read_from_its_log(digits):
    model, x, y = digits
    threat = BIG
    run = run_official(model, x, y, threat)
    assert run.stages == ["clean", "apgd-ce"]
    assert run.forwards > 100 * len(y) and run.backwards > 100 * len(y) // 2
    acc, _ = robust_accuracy(model, x, y, run.x_adv, threat)
    assert run.curve[-1][1] == pytest.approx(acc)
    assert run.curve[-1][0] <= (run.forwards + run.backwards) / len(y)


def test_compare_reports_ratios_against_the_official(digits):
    model, x, y = digits
    out = compare(model, x, y, BIG, methods=[OFFICIAL, "quick"], repeats=1)
    quick = out["methods"]["quick"]
    official = out["methods"][OFFICIAL]
    vs = quick["vs_autoattack"]
    assert vs["passes_ratio"] == pytest.approx(quick["passes_per_sample"]
                                               / official["passes_per_sample"])
    assert vs["passes_ratio"] < 1  # FGSM + PGD-20 is far cheaper than AutoAttack
    assert official["robust_accuracy"] == 0 and quick["robust_accuracy"] >= 0
    assert [p["stage"] for p in official["curve"]] == ["clean", "apgd-ce"]
    with pytest.raises(ValueError, match="unknown method"):
        compare(model, x, y, Threat("linf", 0.1), methods=["nope"], repeats=1)


def test_plot_and_table_from_the_comparison_json(digits, tmp_path):
    from unmask.bench.perf.autoattack import main, markdown_table, plot_strength_per_cost

    model, x, y = digits
    out = compare(model, x, y, BIG, methods=[OFFICIAL, "quick"], repeats=1)
    out.update({"model": "digits-mlp", "n": len(y), "threat": BIG.to_dict()})
    table = markdown_table([out])
    assert "| digits-mlp | quick |" in table and "| digits-mlp | autoattack |" in table
    png = plot_strength_per_cost([out], tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(out))
    assert main(["--plot", str(path), "--figure", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()
    with pytest.raises(ValueError, match="no comparison"):
        plot_strength_per_cost([], tmp_path / "h.png")


def test_command_line_end_to_end_with_golden_writes_its_json(tmp_path, digits_mlp, capsys):
    """The whole command as it is run for the docs (small), the golden pairs included."""
    from unmask.bench.perf.autoattack import main

    path = tmp_path / "c.json"
    assert main(["--model", "digits-mlp", "--n", "16", "--eps", "0.3", "--repeats", "2",
                 "--methods", "autoattack,quick", "--once", "quick", "--golden",
                 "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["model"] == "digits-mlp" and out["n"] == 16 and out["repeats"] == 2
    assert len(out["methods"]["autoattack"]["seconds_all"]) == 2
    assert len(out["methods"]["quick"]["seconds_all"]) == 1  # --once
    for name in ("apgd-ce", "apgd-t"):
        row = out["golden"][name]
        assert {"unmask", "official", "difference_points"} <= set(row)
        assert abs(row["difference_points"]) <= 100
    assert "vs AutoAttack" in capsys.readouterr().out
