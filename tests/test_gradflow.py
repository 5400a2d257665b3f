"""Gradient-flow audit, branch attribution and Jacobian norm on tiny hand-built models whose
gradient flow is known in closed form."""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unmask.bench.core.training import seeded_init
from unmask.explain import audit, branch_attribution, jacobian_norm
from unmask.explain.gradflow import EXPLODE_RATIO, INPUT_ROW, LOSS_ROW, MODEL_ROW, VANISH_RATIO
from unmask.explain.gradtrace import trace

# --- tiny models --------------------------------------------------------------------------------


class Quantize(nn.Module):
    """An input quantiser (a classic masking defense): round to 8 bits, zero gradient."""

    def forward(self, x):
        return torch.round(x * 255) / 255


class Binarize(nn.Module):
    """A binarised activation: sign(x), zero gradient almost everywhere."""

    def forward(self, x):
        return torch.sign(x)


class Temperature(nn.Module):
    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, z):
        return z * self.t


class Detach(nn.Module):
    def forward(self, x):
        return x.detach()


class RoundInside(nn.Module):
    """A container that quantises with a functional call in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


class ResidualSigmoid(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return x + self.act(self.fc(x))


class Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("broken forward")


def tiny_cnn(classes: int = 10) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 4, 3, padding=1), relu=nn.ReLU(), pool=nn.MaxPool2d(2),
        flat=nn.Flatten(), fc=nn.Linear(4 * 4 * 4, classes)))


def images(n=32, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g)


def labels_of(model, x):
    """Labels the model gets right: every sample is confidently 'correct'."""
    with torch.no_grad():
        return model(x).argmax(1)


def linear_chain(lam: float, k: int, d: int = 8) -> nn.Sequential:
    layers = [nn.Flatten()]
    for _ in range(k):
        lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            lin.weight.copy_(lam * torch.eye(d))
        layers.append(lin)
    return nn.Sequential(*layers)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


# --- vanishing / exploding chains ---------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_linear_chain_gain_is_lambda_per_layer(lam):
    k = 24
    model = linear_chain(lam, k)
    x = torch.rand(16, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, dtype=torch.long)
    report = audit(model, x, y, loss="margin")  # CE would saturate on 2^24-scaled logits
    top = report.row(LOSS_ROW).in_norms
    for j in range(1, k + 1):  # the j-th linear layer counted from the output
        row = report.row(str(k - j + 1))
        assert row.gain == pytest.approx(lam, rel=1e-5)
        torch.testing.assert_close(row.in_norms, top * lam**j, rtol=1e-5, atol=0)
    torch.testing.assert_close(report.input.in_norms, top * lam**k, rtol=1e-5, atol=0)
    if lam < 1:  # flagged where the cumulative gain first drops below VANISH_RATIO
        j_star = next(j for j in range(1, k + 1) if lam**j < VANISH_RATIO)
        assert report.collapse_at == str(k - j_star + 1)
        assert report.explode_at is None and report.vanishing
    elif lam > 1:
        j_star = next(j for j in range(1, k + 1) if lam**j > EXPLODE_RATIO)
        assert report.explode_at == str(k - j_star + 1)
        assert report.collapse_at is None and report.exploding
        assert "explodes at" in report.summary
    else:
        assert report.collapse_at is None and report.explode_at is None
        assert "the gradient flows" in report.summary


def test_deep_sigmoid_collapses_residual_does_not():
    depth, width = 20, 16
    with seeded_init(0):
        layers = [nn.Flatten()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        sigmoid_mlp = nn.Sequential(*layers, nn.Linear(width, 10))
        residual = nn.Sequential(nn.Flatten(), *[ResidualSigmoid(width) for _ in range(depth)],
                                 nn.Linear(width, 10))
    x = images(32, side=4)
    y = torch.arange(32) % 10
    report = audit(sigmoid_mlp, x, y)
    sig_rows = [r for r in report.rows if r.kind == "Sigmoid"]
    assert len(sig_rows) == depth
    for r in sig_rows:  # sigma' <= 1/4 elementwise, so per sample |g_in| <= |g_out| / 4
        assert (r.in_norms <= 0.25 * r.out_norms * (1 + 1e-6)).all()
        assert r.gain <= 0.25
    assert report.collapse_at is not None
    assert report.input_ratio < VANISH_RATIO

    res = audit(residual, x, y)
    assert res.collapse_at is None and res.explode_at is None
    assert res.input_ratio > 1e-2
    block = res.row("1")  # a non-leaf module: its functional `+` is reported at its level
    assert not block.leaf and "add" in block.functional
    assert block.gain > 0.5


# --- masking controls ---------------------------------------------------------------------------


def test_input_quantiser_localised():
    with seeded_init(0):
        model = nn.Sequential(OrderedDict(
            pre=nn.Sequential(OrderedDict(quantize=Quantize())), net=tiny_cnn()))
    x = images()
    report = audit(model, x, labels_of(model, x))
    assert report.collapse_at == "pre.quantize"
    assert report.collapse_reason == "zero"
    assert report.input_zero_samples == 1.0
    assert report.row("pre.quantize").gain == 0
    assert report.row("net.conv").grad_in.median > 0  # alive right up to the quantiser
    assert report.summary == ("the input gradient is exactly zero for 100% of samples; "
                              "it vanishes at `pre.quantize` (gain 0)")


def test_mid_network_binarised_activation_localised():
    with seeded_init(0):
        model = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(1, 4, 3, padding=1), binarize=Binarize(),
            conv2=nn.Conv2d(4, 4, 3, padding=1), relu=nn.ReLU(), flat=nn.Flatten(),
            fc=nn.Linear(4 * 8 * 8, 10)))
    x = images()
    report = audit(model, x, labels_of(model, x))
    assert report.collapse_at == "binarize"
    assert report.row("conv2").grad_in.median > 0
    assert "`binarize` (gain 0)" in report.summary


def test_functional_quantiser_reported_at_container():
    with seeded_init(0):
        model = nn.Sequential(OrderedDict(wrap=RoundInside()))
    x = images()
    report = audit(model, x, labels_of(model, x))
    assert report.collapse_at == "wrap"
    assert "round" in report.row("wrap").functional


def test_temperature_collapses_ce_not_margin():
    with seeded_init(0):
        model = nn.Sequential(OrderedDict(net=tiny_cnn(), temp=Temperature(1000.0)))
    with torch.no_grad():  # logit margins of a trained model (a few units), not of random init
        model.net.fc.weight.mul_(50.0)
    x = images()
    y = labels_of(model, x)
    ce = audit(model, x, y, loss="ce")
    assert ce.collapse_at == LOSS_ROW
    assert ce.input_zero_samples > 0.9
    assert "vanishes in the ce loss" in ce.summary
    mg = audit(model, x, y, loss="margin")
    assert mg.collapse_at is None and mg.explode_at is None
    assert mg.input_zero_samples == 0.0
    assert mg.row("temp").gain == pytest.approx(1000.0, rel=1e-5)


def test_detach_localised_even_without_any_logit_gradient():
    with seeded_init(0):
        model = nn.Sequential(Detach(), tiny_cnn())
    x = images()
    report = audit(model, x, labels_of(model, x))
    assert report.collapse_at == "0"
    assert report.row("0").detached
    assert report.input_zero_samples == 1.0
    assert "`0` (detached)" in report.summary


def test_dead_relu_full_and_leaky_relu_none():
    def build(act):
        with seeded_init(0):
            model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                                  act, nn.Linear(16, 10))
        with torch.no_grad():
            model[3].bias.fill_(-100.0)
        return model

    x = images(32, side=4)
    y = torch.arange(32) % 10
    relu = audit(build(nn.ReLU()), x, y)
    assert relu.row("4").dead == 1.0
    assert relu.row("2").dead < 1.0
    assert relu.collapse_at == "4"
    leaky = audit(build(nn.LeakyReLU(0.01)), x, y)
    assert leaky.row("4").dead == 0.0
    assert leaky.row("4").gain == pytest.approx(0.01, rel=1e-4)
    assert leaky.collapse_at is None


def test_nan_gradient_localised():
    class Sqrt(nn.Module):
        def forward(self, x):
            return x.sqrt()  # infinite slope at 0

    with seeded_init(0):
        model = nn.Sequential(OrderedDict(root=Sqrt(), net=tiny_cnn()))
    x = images()
    x[:, :, 0, 0] = 0.0
    report = audit(model, x, labels_of(model, x))
    assert report.explode_at == "root"
    assert report.row("root").nan_in + report.row("root").inf_in > 0
    assert report.input_nonfinite_samples == 1.0

    nan_logits = nn.Sequential(tiny_cnn(), Temperature(float("nan")))
    broken = audit(nan_logits, x, torch.zeros(32, dtype=torch.long))
    assert broken.explode_at == LOSS_ROW and broken.collapse_at is None
    assert "first appear at `<loss>`" in broken.summary


# --- reporting ----------------------------------------------------------------------------------


def test_rows_input_last_names_and_repeated_calls(tmp_path):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(16, 16), nn.Linear(16, 10), nn.ReLU()

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.act(x.flatten(1)))))

    with seeded_init(0):
        model = Twice()
    x = images(8, side=4)
    report = audit(model, x, torch.zeros(8, dtype=torch.long), batch_size=3)
    names = [r.label for r in report.rows]
    assert names[0] == LOSS_ROW and names[-1] == INPUT_ROW
    assert names[1:-1] == [MODEL_ROW, "fc2", "act#2", "fc1", "act"]  # backward order
    assert report.row(MODEL_ROW).functional == ("flatten",)
    assert report.row("act", call=1).in_norms.shape == (8,)
    assert report.n == 8
    data = json.loads(report.to_json(per_sample=True))
    assert data["rows"][-1]["name"] == INPUT_ROW and len(data["rows"][-1]["in_norms"]) == 8
    table = report.table()
    assert table.splitlines()[0].startswith("module") and "act#2" in table
    path = tmp_path / "sub" / "flow.png"
    report.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="no row"):
        report.row("nope")


def test_view_rewritten_in_place_is_unmeasured_not_zero():
    class AddInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.ident = nn.Linear(16, 16), nn.Identity()

        def forward(self, x):
            h = x.flatten(1)
            out = self.ident(self.fc(h))  # Identity hands back the hooked view ...
            out += h  # ... which is then rewritten in place: its hooks can no longer fire
            return out[:, :10]

    with seeded_init(0):
        model = AddInPlace()
    report = audit(model, images(8, side=4), torch.zeros(8, dtype=torch.long))
    row = report.row("ident")
    assert row.grad_in is None and row.grad_out is None and "not measured" in row.note
    assert report.row("fc").grad_in.median > 0
    assert report.collapse_at is None


def test_bad_arguments():
    model = tiny_cnn()
    x = images(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="'ce', 'margin'"):
        audit(model, x, y, loss="hinge")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit(model, x * 3, y)
    with pytest.raises(ValueError, match="batch_size"):
        audit(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="labels go up to class 12"):
        audit(model, x, torch.full((4,), 12))


# --- no trace -----------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.relu(self.bn(x)))


def _no_trace_model() -> nn.Sequential:
    with seeded_init(0):
        model = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(1, 4, 3, padding=1), relu=nn.ReLU(inplace=True), block=_Block(),
            drop=nn.Dropout(0.5), pool=nn.MaxPool2d(2), flat=nn.Flatten(),
            fc=nn.Linear(4 * 4 * 4, 10)))
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.block.bn.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
        model.block.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    return model


def _forward_backward(model, x, y):
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    F.cross_entropy(logits, y, reduction="sum").backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return logits.detach(), xg.grad, grads


def test_hooks_leave_no_trace_bit_identical():
    model = _no_trace_model().eval()
    x = images(16)
    y = torch.arange(16) % 10
    before = _forward_backward(model, x, y)
    with trace(model) as tracer:
        tracer.begin(x.shape[0], x.device)
        during = _forward_backward(model, x, y)
        assert hook_count(model) > 0
    after = _forward_backward(model, x, y)
    for other in (during, after):
        assert torch.equal(before[0], other[0])
        assert torch.equal(before[1], other[1])
        assert all(torch.equal(a, b) for a, b in zip(before[2], other[2]) if a is not None)
        assert [a is None for a in before[2]] == [b is None for b in other[2]]
    assert hook_count(model) == 0
    assert model.relu.inplace is True


def test_audit_restores_mode_flags_and_leaves_no_grads():
    model = _no_trace_model()
    model.train()
    model.block.train(False)  # a mixed state to restore exactly
    model.fc.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x = images(16)
    y = torch.arange(16) % 10
    with pytest.warns(UserWarning, match="train mode"):
        report = audit(model, x, y)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert hook_count(model) == 0 and model.relu.inplace is True
    assert torch._C._len_torch_function_stack() == 0
    # the audited input gradient is the one of an un-hooked eval-mode run
    model.eval()
    _, xgrad, _ = _forward_backward(model, x, y)
    torch.testing.assert_close(report.input.in_norms, xgrad.flatten(1).norm(dim=1),
                               rtol=1e-6, atol=0)
    assert report.row("block").functional == ("relu", "add")
    assert report.row("relu").grad_in is not None  # in-place ReLU measured


def test_hooks_removed_when_forward_raises():
    model = nn.Sequential(OrderedDict(ok=_no_trace_model(), bad=Raises()))
    model.eval()
    x = images(4)
    with pytest.raises(RuntimeError, match="broken forward"):
        audit(model, x, torch.zeros(4, dtype=torch.long))
    assert hook_count(model) == 0
    assert model.ok.relu.inplace is True
    assert not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch._C._len_torch_function_stack() == 0


# --- zoo model, CLI -----------------------------------------------------------------------------


def test_mnist_cnn_healthy_and_fast(mnist_cnn, mnist_test):
    x, y = mnist_test[0][:256], mnist_test[1][:256]
    audit(mnist_cnn, x[:8], y[:8])  # warm-up (lazy imports, allocator)
    start = time.perf_counter()
    report = audit(mnist_cnn, x, y)
    took = time.perf_counter() - start
    assert took < 10.0, f"audit of mnist-cnn on 256 samples took {took:.1f}s"
    assert report.collapse_at is None and report.explode_at is None
    leaves = [n for n, m in mnist_cnn.named_modules() if n and not list(m.children())]
    assert sorted(r.name for r in report.rows[1:-1]) == sorted(leaves)
    assert report.input_zero_samples == 0.0
    assert all(math.isfinite(r.grad_in.median) for r in report.rows if r.grad_in)


def test_cli_gradflow(mnist_cnn, tmp_path, capsys):
    from unmask.bench.cli.main import main

    png, js = tmp_path / "fig.png", tmp_path / "report.json"
    assert main(["gradflow", "mnist-cnn", "--out", str(png), "--n", "32", "--loss", "margin",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "<input>" in out and "features.0" in out and "the gradient flows" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(js.read_text())["loss"] == "margin"
    assert main(["gradflow", "no-such-model"]) == 2


# --- branch attribution -------------------------------------------------------------------------


class TwoBranch(nn.Module):
    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(16, 12)
        self.head = nn.Linear(12, 10)
        self.skip = nn.Linear(16, 12) if skip else None

    def forward(self, x):
        h = x.flatten(1)
        z = self.a(h) + self.b(h)
        if self.skip is not None:
            z = z + self.skip(h)
        return self.head(torch.tanh(z))


def test_branch_attribution_splits_exactly():
    with seeded_init(0):
        model = TwoBranch(skip=False)
    with torch.no_grad():
        model.b.weight.copy_(3 * model.a.weight)
    x = images(16, side=4)
    y = torch.arange(16) % 10
    ba = branch_attribution(model, x, y, branches=[model.a, "b"])
    assert ba.names == ["a", "b"]
    torch.testing.assert_close(ba.share[:, 0], torch.full((16,), 0.25), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ba.share[:, 1], torch.full((16,), 0.75), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ba.interaction, torch.zeros(16), rtol=0, atol=1e-5)
    assert ba.median_share() == pytest.approx({"a": 0.25, "b": 0.75}, rel=1e-4)

    with seeded_init(1):
        skip = TwoBranch(skip=True)
    bs = branch_attribution(skip, x, y, branches=["a", "b"])
    total = bs.share.sum(1) + bs.through_none + bs.interaction
    torch.testing.assert_close(total, torch.ones(16), rtol=0, atol=1e-5)
    assert bs.through_none.abs().min() > 0  # the skip path carries part of the gradient


def test_branch_attribution_series_is_interaction():
    with seeded_init(0):
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10))
    x = images(8, side=4)
    ba = branch_attribution(model, x, torch.zeros(8, dtype=torch.long), branches=["1", "3"])
    torch.testing.assert_close(ba.interaction, torch.ones(8), rtol=0, atol=1e-6)
    assert float(ba.share.abs().max()) == 0.0
    with pytest.raises(ValueError, match="no sub-module named"):
        branch_attribution(model, x, torch.zeros(8, dtype=torch.long), branches=["7"])
    assert hook_count(model) == 0


# --- Jacobian norm ------------------------------------------------------------------------------


def test_jacobian_norm_of_linear_model_is_largest_singular_value():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    s = torch.tensor([7.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, 0.05])
    w = u @ torch.diag(s) @ v[:10]
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        model[1].weight.copy_(w)
    x = images(6, side=4)
    jn = jacobian_norm(model, x, iters=20, generator=0)
    sigma = torch.linalg.matrix_norm(w, 2)
    torch.testing.assert_close(jn.sigma, sigma.expand(6), rtol=1e-4, atol=0)
    layer = {la.name: la for la in jn.layers}
    assert layer["1"].median == pytest.approx(float(sigma), rel=1e-4)
    assert layer["0"].median == pytest.approx(1.0, rel=1e-5)  # Flatten


def test_jacobian_norm_matches_exact_svd_on_nonlinear_model():
    with seeded_init(0):
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(inplace=True),
                              nn.Linear(12, 5))
    x = images(4, side=4)
    jn = jacobian_norm(model, x, iters=60, generator=torch.Generator().manual_seed(3))
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda t: model(t[None])[0], x[i])
        exact = torch.linalg.matrix_norm(jac.reshape(5, -1), 2)
        assert float(jn.sigma[i]) == pytest.approx(float(exact), rel=1e-3)
    assert {la.name for la in jn.layers} == {"0", "1", "2", "3"}
    with pytest.raises(ValueError, match="iters"):
        jacobian_norm(model, x, iters=0)
