"""Gradient-flow audit: where in a network the input gradient vanishes, explodes or breaks.

Every gradient attack, saliency map and training step rides on one signal; when a robustness
number is false (gradient masking, Athalye et al. 2018, "Obfuscated Gradients Give a False Sense
of Security") that signal was silenced somewhere. :func:`audit` hooks every module, runs one
forward and backward pass of the chosen loss and reports, per module call, the norm of the
gradient w.r.t. the module's output and input (per sample, then median and spread), the local
gain, the share of exactly-zero entries, NaN/Inf counts and, for ReLU-like modules, the share of
units never active over the batch (dead units). ``collapse_at`` / ``explode_at`` name the module
where the gradient dies or blows up.

Usage::

    report = audit(model, x, y, loss="ce")
    print(report.table()); print(report.summary)
    report.plot("gradflow.png")

Shapes: ``x`` is ``N x C x H x W`` in [0, 1], ``y`` int64 ``N``; the model returns logits ``N x K``.
The audit leaves no trace: the model's mode, ``requires_grad`` flags and hooks are restored even
when its forward raises, and its outputs and gradients are bit-identical to an un-audited run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench.core import StrEnum, check_inputs, check_logits, margin, model_mode, parse_enum
from ..bench.core import warn_if_train_mode as _warn_if_train_mode
from ..bench.core.fileio import atomic_write, json_safe
from ..bench.core.text import text_table
from .gradtrace import Tracer, merge_calls, trace

__all__ = [
    "AuditLoss",
    "NormStats",
    "ModuleFlow",
    "GradFlowReport",
    "audit",
    "COLLAPSE_GAIN",
    "EXPLODE_GAIN",
    "VANISH_RATIO",
    "EXPLODE_RATIO",
    "INPUT_ROW",
    "LOSS_ROW",
    "MODEL_ROW",
]

log = logging.getLogger(__name__)

SCHEMA = 1

# --- decision rules -----------------------------------------------------------------------------
# A single module that shrinks the gradient norm 10^4-fold is a masking suspect: convolutions,
# BatchNorm, pooling and (partly active) ReLUs change the norm by one or two orders of magnitude
# at most; only saturated squashing (sigmoid/tanh tails, steep thresholds, huge temperatures)
# or non-differentiable steps fall this far.
COLLAPSE_GAIN = 1e-4
# The mirror image: a module that amplifies the gradient 10^4-fold (a temperature, a
# near-singular normalisation) makes first-order steps meaningless.
EXPLODE_GAIN = 1e4
# Cumulative rules, relative to the gradient at the logits: an input gradient a million times
# smaller than the logit gradient carries no usable direction in float32 attack steps (a deep
# sigmoid chain, lambda^k with lambda < 1) ...
VANISH_RATIO = 1e-6
# ... and one a million times larger is dominated by a few exploding paths (lambda^k, lambda > 1).
# Well-trained standard models sit between 1e-2 and 1e3 (the local Lipschitz range).
EXPLODE_RATIO = 1e6

# Names of the rows that are not modules.
INPUT_ROW = "<input>"  # the gradient w.r.t. the model's input, the last row
LOSS_ROW = "<loss>"  # the gradient w.r.t. the logits, the first row
MODEL_ROW = "<model>"  # the model's own forward, when it makes functional calls itself


class AuditLoss(StrEnum):
    """The loss whose gradient is audited: cross-entropy or the (negative) logit margin."""

    CE = "ce"
    MARGIN = "margin"


def audit_loss(logits: Tensor, y: Tensor, loss: AuditLoss) -> Tensor:
    """Summed (not averaged) loss, so a sample's gradient does not depend on the batch size."""
    if loss is AuditLoss.CE:
        return F.cross_entropy(logits, y, reduction="sum")
    return -margin(logits, y).sum()


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormStats:
    """Median and spread of per-sample gradient norms (NaNs, from NaN gradients, ignored)."""

    median: float
    q25: float
    q75: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Tensor) -> NormStats:
        """Statistics of a tensor of per-sample norms (all NaN when it is empty or all NaN)."""
        v = values.detach().double().cpu()
        if v.numel() == 0 or bool(torch.isnan(v).all()):
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan)
        q = torch.nanquantile(v, torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64))
        finite = v[~torch.isnan(v)]
        return cls(float(q[0]), float(q[1]), float(q[2]), float(finite.min()), float(finite.max()))

    def to_dict(self) -> dict[str, float]:
        """The statistics as a dict of floats (median, q25, q75, min, max)."""
        return {"median": self.median, "q25": self.q25, "q75": self.q75, "min": self.min,
                "max": self.max}


@dataclass
class ModuleFlow:
    """One row of the audit: one call of one module (or the loss / input row).

    Attributes:
        name: qualified name as in ``model.named_modules()``, or ``<loss>``, ``<input>``,
            ``<model>`` (the model's own functional calls).
        kind: the module's class name (``loss`` / ``input`` for the special rows).
        call: 0 for a module's first call in a forward pass, 1 for its second, ...
        depth: position in forward order (0 is the input), for the depth plot.
        leaf: the module has no children. A container is a row only when its forward makes
            functional calls (``functional``): they are reported at this, the nearest hooked
            level, with the container's overall input/output gradient.
        grad_out / grad_in: per-sample L2 norms of the gradient w.r.t. the module's output and
            input; None when no gradient reached them (off the gradient path or not measured).
        gain: median over samples of ``|grad_in| / |grad_out|`` (None where undefined).
        zero_out / zero_in: share of exactly-zero gradient entries.
        nan_in / inf_in / nan_out / inf_out: counts of NaN and Inf gradient entries.
        dead: for ReLU-like leaves, share of units never active over the batch.
        detached: the input needs a gradient but the output does not (``detach``, ``no_grad``,
            ``argmax``): the graph is cut here.
        note: what else a reader should know (in-place inputs, batch-level norms).
    """

    name: str
    kind: str
    call: int = 0
    depth: int = 0
    leaf: bool = True
    functional: tuple[str, ...] = ()
    grad_out: NormStats | None = None
    grad_in: NormStats | None = None
    gain: float | None = None
    zero_out: float | None = None
    zero_in: float | None = None
    nan_in: int = 0
    inf_in: int = 0
    nan_out: int = 0
    inf_out: int = 0
    dead: float | None = None
    detached: bool = False
    note: str = ""
    out_norms: Tensor | None = field(default=None, repr=False)
    in_norms: Tensor | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The row's name in tables: the module name, with ``#k`` for its k-th call (k >= 2)."""
        return self.name if self.call == 0 else f"{self.name}#{self.call + 1}"

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """The row as a JSON-ready dict; ``per_sample`` adds the per-sample gradient norms."""
        d = {
            "name": self.name, "kind": self.kind, "call": self.call, "depth": self.depth,
            "leaf": self.leaf, "functional": [*self.functional],
            "grad_out": self.grad_out.to_dict() if self.grad_out else None,
            "grad_in": self.grad_in.to_dict() if self.grad_in else None,
            "gain": self.gain, "zero_out": self.zero_out, "zero_in": self.zero_in,
            "nan_in": self.nan_in, "inf_in": self.inf_in, "nan_out": self.nan_out,
            "inf_out": self.inf_out, "dead": self.dead, "detached": self.detached,
            "note": self.note,
        }
        if per_sample:
            d["out_norms"] = None if self.out_norms is None else self.out_norms.tolist()
            d["in_norms"] = None if self.in_norms is None else self.in_norms.tolist()
        return d


@dataclass
class GradFlowReport:
    """What :func:`audit` found. ``rows`` run from the loss back to the input (the last row).

    ``collapse_at`` / ``explode_at`` are qualified module names (or ``<loss>`` when the logit
    gradient itself is zero, as with a saturated softmax), or None when the input gradient is
    healthy. ``summary`` is one line a diagnosis can quote.
    """

    rows: list[ModuleFlow]
    loss: str
    n: int
    collapse_at: str | None = None
    explode_at: str | None = None
    collapse_reason: str = ""
    explode_reason: str = ""
    input_zero_samples: float = 0.0  # share of samples whose input gradient is exactly zero
    input_nonfinite_samples: float = 0.0  # share of samples with NaN/Inf input-gradient entries
    input_ratio: float = float("nan")  # median |grad_x| / median |grad_logits|

    @property
    def input(self) -> ModuleFlow:
        """The last row: the gradient that reaches the input."""
        return self.rows[-1]

    @property
    def vanishing(self) -> bool:
        """True when the input gradient collapsed (``collapse_at`` is set)."""
        return self.collapse_at is not None

    @property
    def exploding(self) -> bool:
        """True when the input gradient exploded (``explode_at`` is set)."""
        return self.explode_at is not None

    def row(self, name: str, call: int = 0) -> ModuleFlow:
        """The row of module ``name`` (its ``call``-th call)."""
        for r in self.rows:
            if r.name == name and r.call == call:
                return r
        known = ", ".join(dict.fromkeys(r.name for r in self.rows))
        raise KeyError(f"no row {name!r} (call {call}); rows: {known}")

    def find(self, name: str | None) -> ModuleFlow | None:
        """The first row of module ``name``, or None (also when ``name`` is None)."""
        return None if name is None else next((r for r in self.rows if r.name == name), None)

    @property
    def summary(self) -> str:
        """One line: is the input gradient alive, and if not, where did it die."""
        return _summary(self)

    def table(self) -> str:
        """The rows as a fixed-width text table (loss first, input last)."""
        header = ("module", "kind", "|g_out|", "|g_in|", "g_in q25-q75", "gain", "zero_in",
                  "nan/inf", "dead", "note")
        cells = [header]
        for r in self.rows:
            mark = ""
            if r.name == self.collapse_at:
                mark = "<< collapse"
            elif r.name == self.explode_at:
                mark = "<< explode"
            spread = (f"{_fmt(r.grad_in.q25)}-{_fmt(r.grad_in.q75)}" if r.grad_in else "")
            note = "; ".join(p for p in (mark, r.note) if p)
            cells.append((
                r.label, r.kind, _fmt(r.grad_out.median) if r.grad_out else "",
                _fmt(r.grad_in.median) if r.grad_in else "", spread, _fmt(r.gain),
                _pct(r.zero_in), f"{r.nan_in + r.nan_out}/{r.inf_in + r.inf_out}"
                if (r.nan_in or r.inf_in or r.nan_out or r.inf_out) else "",
                _pct(r.dead), note,
            ))
        return text_table(cells[1:], cells[0])

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """The report as a JSON-ready dict with its schema version, verdicts, thresholds and
        rows; ``per_sample`` adds each row's per-sample gradient norms.
        """
        return {
            "schema": SCHEMA, "loss": self.loss, "n": self.n, "collapse_at": self.collapse_at,
            "explode_at": self.explode_at, "collapse_reason": self.collapse_reason,
            "explode_reason": self.explode_reason, "summary": self.summary,
            "input_zero_samples": self.input_zero_samples,
            "input_nonfinite_samples": self.input_nonfinite_samples,
            "input_ratio": self.input_ratio,
            "rules": {"COLLAPSE_GAIN": COLLAPSE_GAIN, "EXPLODE_GAIN": EXPLODE_GAIN,
                      "VANISH_RATIO": VANISH_RATIO, "EXPLODE_RATIO": EXPLODE_RATIO},
            "rows": [r.to_dict(per_sample) for r in self.rows],
        }

    def to_json(self, per_sample: bool = False, indent: int | None = 2) -> str:
        """JSON text; NaN/Inf become null (strict JSON)."""
        return json.dumps(json_safe(self.to_dict(per_sample)), indent=indent)

    def plot(self, path: str | os.PathLike | None = None, *, title: str | None = None):
        """Gradient-norm profile over depth (log scale), collapse and explosion marked.

        Returns the matplotlib ``Figure``; with ``path`` also writes it as PNG (atomically).
        """
        fig = _plot(self, title)
        if path is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            atomic_write(path, buf.getvalue())
        return fig


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if math.isnan(v):
        return "nan"
    if v == 0:
        return "0"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


# --- the audit ----------------------------------------------------------------------------------


def audit(model: nn.Module, x: Tensor, y: Tensor, *, loss: str | AuditLoss = "ce",
          batch_size: int | None = 256) -> GradFlowReport:
    """Audit the gradient flow of ``loss`` through ``model`` at ``(x, y)``.

    Args:
        model: any ``nn.Module`` taking ``N x C x H x W`` inputs in [0, 1] and returning logits.
        x, y: images ``N x C x H x W`` in [0, 1] and int64 labels ``N``.
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (``max_{j != y} z_j - z_y``, the loss of
            margin-based attacks, which does not saturate).
        batch_size: samples per forward/backward pass (bounds memory); None for one pass.

    Runs in eval mode with frozen parameters (restored afterwards). Returns a
    :class:`GradFlowReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_kind = parse_enum(AuditLoss, loss, "loss")
    x, y = check_inputs(x, y)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    n = x.shape[0]
    step = n if batch_size is None else batch_size
    _warn_if_train_mode(model, stacklevel=3)
    with model_mode(model, train=False, freeze=True), trace(model) as tracer:
        for start in range(0, n, step):
            xb, yb = x[start:start + step], y[start:start + step]
            tracer.begin(xb.shape[0], xb.device)
            xb = xb.detach().requires_grad_(True)
            tracer.watch(xb, INPUT_ROW, "in")
            # The audit localises where NaN or Inf first appears: non-finite logits are its
            # subject, not an input error.
            logits = check_logits(model(xb), xb.shape[0], finite=False, labels=yb)
            tracer.check_inplace()
            tracer.stack.clear()
            if logits.requires_grad:
                tracer.watch(logits, LOSS_ROW, "in")
                value = audit_loss(logits, yb, loss_kind)
                # backward() over the whole graph (not grad(.., x)): modules cut off from the
                # input by a detach still show the gradient that reaches them. Parameters are
                # frozen, so only our own leaf ``xb`` accumulates a .grad.
                value.backward()
            else:
                log.warning("the model's output does not depend on its input through autograd:"
                            " the gradient is cut before the logits")
    return _build_report(tracer, n, loss_kind.value)


# --- assembling the report ----------------------------------------------------------------------


def _row_from(name: str, kind: str, call: int, leaf: bool, m: dict[str, Any]) -> ModuleFlow:
    row = ModuleFlow(name=name, kind=kind, call=call, leaf=leaf, functional=m["functional"],
                     dead=m["dead"])
    notes = []
    detached = m["needs_in"] and m["has_out"] and not m["needs_out"]
    row.detached = detached
    o, i = m["out"], m["inp"]
    if m["needs_out"] and not o["fired"] and o["rewritten"]:
        notes.append("output modified in place later: not measured")
    if o["fired"]:
        row.out_norms = o["sq"].sqrt().float()
        row.grad_out = NormStats.of(row.out_norms)
        row.zero_out = o["zeros"] / max(o["numel"], 1)
        row.nan_out, row.inf_out = o["nans"], o["infs"]
    if m["needs_in"]:
        if i["fired"]:
            row.in_norms = i["sq"].sqrt().float()
        elif i["rewritten"]:
            notes.append("input modified in place: not measured")
        elif o["fired"] or detached or kind == "input":
            # Nothing came back although a gradient left the output (or the graph is cut):
            # the module's backward produced no gradient at all, which is a zero gradient.
            row.in_norms = torch.zeros(len(o["sq"]) if o["fired"] else len(i["sq"]))
        if row.in_norms is not None:
            row.grad_in = NormStats.of(row.in_norms)
            row.zero_in = i["zeros"] / i["numel"] if i["numel"] else 1.0
            row.nan_in, row.inf_in = i["nans"], i["infs"]
    if row.in_norms is not None and row.out_norms is not None:
        ratio = row.in_norms.double() / row.out_norms.double()
        ratio = ratio[row.out_norms > 0]
        row.gain = float(torch.nanmedian(ratio)) if ratio.numel() else None
        if row.gain is not None and math.isnan(row.gain):
            row.gain = None
    elif detached:
        row.gain = 0.0
    if detached:
        notes.append("detached: the output does not depend on the input through autograd")
    if not (o["per_sample"] and i["per_sample"]):
        notes.append("no batch dimension: batch-level norms")
    if row.functional:
        notes.append("functional: " + ", ".join(row.functional[:6])
                     + (", ..." if len(row.functional) > 6 else ""))
    row.note = "; ".join(notes)
    return row


def _build_report(tracer: Tracer, n: int, loss: str) -> GradFlowReport:
    passes = tracer.passes
    n_per_pass = [len(next(iter(p.values())).inp.sq) if p else 0 for p in passes]
    keys: list[tuple[str, int]] = []
    for p in passes:
        for key in p:
            if key not in keys and key[0] not in (INPUT_ROW, LOSS_ROW):
                keys.append(key)
    root = tracer.names.get(id(tracer.model), "")
    rows: list[ModuleFlow] = []
    for key in keys:
        recs = [p.get(key) for p in passes]
        first = next(r for r in recs if r is not None)
        if first.end < 0:
            continue
        m = merge_calls(recs, n_per_pass)
        if not first.leaf and not m["functional"]:
            continue  # a pure container: its children carry the information
        name = MODEL_ROW if key[0] == root else key[0]
        rows.append(_row_from(name, first.kind, key[1], first.leaf, m))
    rows.sort(key=lambda r: tracer.order.get((root if r.name == MODEL_ROW else r.name, r.call), 0))
    for depth, r in enumerate(rows, start=1):
        r.depth = depth
    rows.reverse()  # from the output back to the input

    loss_row = _row_from(LOSS_ROW, "loss", 0, True,
                         merge_calls([p.get((LOSS_ROW, 0)) for p in passes], n_per_pass))
    loss_row.depth = len(rows) + 1
    input_row = _row_from(INPUT_ROW, "input", 0, True,
                          merge_calls([p.get((INPUT_ROW, 0)) for p in passes], n_per_pass))
    if input_row.in_norms is None:
        input_row.in_norms = torch.zeros(n)
        input_row.grad_in = NormStats.of(input_row.in_norms)
        input_row.zero_in = 1.0
    input_row.depth = 0
    rows = [loss_row, *rows, input_row]
    report = GradFlowReport(rows=rows, loss=loss, n=n)
    _localise(report)
    return report


# --- localisation -------------------------------------------------------------------------------


def _descends(child: str, parent: str) -> bool:
    if parent == MODEL_ROW:
        return child not in (MODEL_ROW, LOSS_ROW, INPUT_ROW)
    return child.startswith(parent + ".")


def _pick(rows: list[ModuleFlow], candidate, healthy) -> ModuleFlow | None:
    """The first candidate, walking from the output back, after which the gradient never
    recovers (no later row, other than the candidate's own sub-modules, is healthy); then the
    deepest sub-module that is itself such a candidate."""

    def accepted(i: int, within: str | None) -> bool:
        r = rows[i]
        if not candidate(r):
            return False
        for later in rows[i + 1:]:
            if _descends(later.name, r.name) or later.name == r.name:
                continue
            if within is not None and not _descends(later.name, within):
                continue
            if healthy(later):
                return False
        return True

    found, within = None, None
    while True:
        nxt = None
        for i, r in enumerate(rows):
            if found is not None and not _descends(r.name, found.name):
                continue
            if r is found:
                continue
            if accepted(i, within):
                nxt = r
                break
        if nxt is None:
            return found
        found, within = nxt, nxt.name
        if nxt.leaf:
            return found


def _localise(report: GradFlowReport) -> None:
    rows = report.rows
    loss_row, input_row = rows[0], rows[-1]
    ref = loss_row.grad_in.median if loss_row.grad_in else float("nan")
    g_in = input_row.in_norms
    report.input_zero_samples = float((g_in == 0).float().mean()) if g_in is not None else 1.0
    bad = torch.isnan(g_in) | torch.isinf(g_in) if g_in is not None else None
    report.input_nonfinite_samples = float(bad.float().mean()) if bad is not None else 0.0
    in_med = input_row.grad_in.median if input_row.grad_in else 0.0
    report.input_ratio = in_med / ref if ref and ref > 0 and not math.isnan(ref) else float("nan")

    def rel(stats: NormStats | None) -> float | None:
        if stats is None or math.isnan(stats.median):
            return None
        if stats.median == 0:
            return 0.0
        return stats.median / ref if ref > 0 else math.inf

    def collapsed_in(r: ModuleFlow) -> bool:
        v = rel(r.grad_in)
        return v is not None and v < VANISH_RATIO

    def healthy_in(r: ModuleFlow) -> bool:
        v = rel(r.grad_in)
        return v is not None and v >= VANISH_RATIO

    def live_out(r: ModuleFlow) -> bool:
        v = rel(r.grad_out)
        return v is not None and v >= VANISH_RATIO

    def collapse_candidate(r: ModuleFlow) -> bool:
        if r.name in (LOSS_ROW, INPUT_ROW):
            return False
        if r.detached:
            return True
        if r.grad_in is None or not live_out(r):
            return False
        return collapsed_in(r) or (r.gain is not None and r.gain < COLLAPSE_GAIN)

    input_collapsed = ref == 0 or collapsed_in(input_row) or report.input_zero_samples >= 0.5
    logits_nonfinite = bool(loss_row.nan_in or loss_row.inf_in)
    if loss_row.grad_in is None:  # no gradient reached the logits at all: the graph is cut
        hit = _pick(rows, lambda r: r.detached, lambda r: False)
        report.collapse_at = hit.name if hit is not None else MODEL_ROW
        report.collapse_reason = "detached"
    elif logits_nonfinite:  # NaN logits or loss: the forward pass is broken, not the backward
        report.explode_at = LOSS_ROW
        report.explode_reason = "nonfinite"
        return
    elif ref == 0:  # the loss itself passes no gradient (a saturated softmax)
        report.collapse_at = LOSS_ROW
        report.collapse_reason = "zero logit gradient"
    elif input_collapsed:
        hit = _pick(rows, collapse_candidate, healthy_in)
        if hit is None:  # no transition found: name where it is first seen collapsed
            hit = next((r for r in rows[1:] if collapsed_in(r)), input_row)
            report.collapse_reason = "collapsed"
        elif hit.detached:
            report.collapse_reason = "detached"
        elif hit.grad_in is not None and hit.grad_in.median == 0:
            report.collapse_reason = "zero"
        elif hit.gain is not None and hit.gain < COLLAPSE_GAIN:
            report.collapse_reason = "gain"
        else:
            report.collapse_reason = "cumulative"
        report.collapse_at = hit.name

    def nonfinite_in(r: ModuleFlow) -> bool:
        return bool(r.nan_in or r.inf_in)

    def exploded_in(r: ModuleFlow) -> bool:
        v = rel(r.grad_in)
        return nonfinite_in(r) or (v is not None and v > EXPLODE_RATIO)

    def calm_in(r: ModuleFlow) -> bool:
        return r.grad_in is not None and not exploded_in(r)

    def explode_candidate(r: ModuleFlow) -> bool:
        if r.name in (LOSS_ROW, INPUT_ROW) or r.grad_in is None:
            return False
        out_bad = bool(r.nan_out or r.inf_out)
        if nonfinite_in(r) and not out_bad:
            return True
        v_out = rel(r.grad_out)
        if out_bad or v_out is None:
            return False
        return (exploded_in(r) and v_out <= EXPLODE_RATIO) or (
            r.gain is not None and r.gain > EXPLODE_GAIN)

    if report.input_nonfinite_samples > 0 or (ref > 0 and exploded_in(input_row)):
        hit = _pick(rows, explode_candidate, calm_in)
        if hit is None:
            hit = next((r for r in rows[1:] if exploded_in(r)), input_row)
            report.explode_reason = "exploded"
        elif nonfinite_in(hit):
            report.explode_reason = "nonfinite"
        elif hit.gain is not None and hit.gain > EXPLODE_GAIN:
            report.explode_reason = "gain"
        else:
            report.explode_reason = "cumulative"
        report.explode_at = hit.name


def _summary(report: GradFlowReport) -> str:
    parts = []
    zero = report.input_zero_samples
    if zero > 0:
        parts.append(f"the input gradient is exactly zero for {100 * zero:.0f}% of samples")
    if report.input_nonfinite_samples > 0:
        parts.append(f"the input gradient has NaN/Inf entries for "
                     f"{100 * report.input_nonfinite_samples:.0f}% of samples")
    ratio = report.input_ratio
    if report.collapse_at == LOSS_ROW:
        lz = report.rows[0]
        share = float((lz.in_norms == 0).float().mean())
        parts.append(f"it vanishes in the {report.loss} loss: the logit gradient is exactly zero "
                     f"for {100 * share:.0f}% of samples (saturated softmax; a margin loss "
                     "does not saturate)")
    elif report.collapse_at is not None:
        row = report.find(report.collapse_at)
        if not parts:
            parts.append(f"the input gradient is {_fmt(ratio)} times the logit gradient")
        gain = "detached" if row is not None and row.detached else (
            f"gain {_fmt(row.gain)}" if row is not None and row.gain is not None else
            report.collapse_reason)
        parts.append(f"it vanishes at `{report.collapse_at}` ({gain})")
    if report.explode_at is not None:
        row = report.find(report.explode_at)
        if report.explode_reason == "nonfinite":
            parts.append(f"NaN/Inf gradients first appear at `{report.explode_at}`")
        else:
            if not report.input_nonfinite_samples:
                parts.append(f"the input gradient is {_fmt(ratio)} times the logit gradient")
            gain = f"gain {_fmt(row.gain)}" if row is not None and row.gain is not None else (
                report.explode_reason)
            parts.append(f"it explodes at `{report.explode_at}` ({gain})")
    if report.collapse_at is None and report.explode_at is None:
        med = report.input.grad_in.median if report.input.grad_in else float("nan")
        parts.append(f"the gradient flows: median input-gradient norm {_fmt(med)} "
                     f"({_fmt(ratio)}x the logit gradient); no module collapses or explodes")
    return "; ".join(parts)


# --- plot ---------------------------------------------------------------------------------------


def _plot(report: GradFlowReport, title: str | None):
    # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
    from matplotlib.figure import Figure

    rows = sorted(report.rows, key=lambda r: r.depth)
    fig = Figure(figsize=(max(6.0, 0.32 * len(rows) + 2.5), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs, med, lo, hi, zeros = [], [], [], [], []
    positive = [r.grad_in.median for r in rows if r.grad_in and r.grad_in.median > 0
                and math.isfinite(r.grad_in.median)]
    floor = min(positive) / 10 if positive else 1e-12
    for r in rows:
        if r.grad_in is None or math.isnan(r.grad_in.median):
            continue
        if r.grad_in.median == 0:
            zeros.append(r.depth)
            continue
        xs.append(r.depth)
        med.append(r.grad_in.median)
        lo.append(max(r.grad_in.q25, floor))
        hi.append(r.grad_in.q75)
    if xs:
        ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, label="q25-q75")
        ax.plot(xs, med, "o-", color="tab:blue", ms=4, label="median |grad w.r.t. input|")
    if zeros:
        ax.plot(zeros, [floor] * len(zeros), "v", color="black", ms=7, label="exactly zero")
    ax.set_yscale("log")
    for name, color, what in ((report.collapse_at, "tab:red", "collapse"),
                              (report.explode_at, "tab:orange", "explosion")):
        row = report.find(name)
        if row is not None:
            ax.axvline(row.depth, color=color, ls="--", lw=1.5, label=f"{what}: {name}")
    ax.set_xticks([r.depth for r in rows])
    ax.set_xticklabels([r.label for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_xlabel("depth (input left, loss right)")
    ax.set_ylabel(f"gradient norm ({report.loss} loss)")
    ax.set_title(textwrap.fill(title or "gradient flow: " + report.summary, 100), fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig
