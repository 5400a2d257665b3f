"""Exact verification by mixed-integer linear programming (Tjeng, Xiao & Tedrake 2019).

Each unstable ReLU ``a = relu(z)`` with pre-activation bounds ``l < 0 < u`` (from CROWN) gets a
binary ``d`` and the big-M encoding ``a >= z, a >= 0, a <= u d, a <= z - l (1 - d)``. Stable
ReLUs get no variable at all: an inactive one is the constant 0, an active one is ``z`` itself,
and every pre-activation ``z`` is substituted as an affine expression of the input and the
unstable units' columns instead of being a column with an equality row. (The first version kept
``z`` as bounded columns tied by equality rows; with CROWN's tight bounds on those columns the
root LP was so degenerate that HiGHS's dual simplex cycled for minutes on a 784-32-10 MLP with
five unstable units. Substituted, the same problem solves in ~10 ms.)

For each class ``j != y`` (the ones CROWN has not already proven, most threatened first) the
margin ``z_y - z_j`` is minimised over the input box (Linf ball ∩ [0, 1]) by HiGHS
(``highspy``); the solve of a class stops as soon as it is decided: the dual bound above
``tol`` (proven for this class) or a primal point below ``-tol`` (a counterexample, which the
caller re-checks on the model in fp32). The solver's dual bound is a proven lower bound of the
margin even when the time limit cuts a solve short. Linf only: an L2 ball is not linear.

Numerics: the pre-activation bounds come from float32 CROWN and are widened by
``1e-5 (1 + |bound|)`` before use, so float rounding cannot cut off a reachable point; a
margin within ``tol`` of 0 is neither proven nor refuted ("unknown").
Cost: exponential in the number of unstable ReLUs; practical for MLPs of a few hundred units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .network import Chain

__all__ = ["MilpOutcome", "milp_margin", "TOL"]

# Margins within TOL of zero are left undecided (HiGHS's feasibility tolerance is 1e-6 on
# coefficients of order 1 over hundreds of terms).
TOL = 1e-5
_WIDEN = 1e-5


@dataclass(frozen=True)
class MilpOutcome:
    """``lower``: proven lower bound of ``min_j margin_j``; ``x_adv``: a point with negative margin
    (flattened input) or None; ``complete``: every class was decided (proven or refuted);
    ``unstable``: unstable ReLUs (binaries) in the encoding; ``seconds``: wall time."""

    lower: float
    x_adv: np.ndarray | None
    complete: bool
    seconds: float
    unstable: int = 0


class _Rows:
    """Constraint rows collected in CSR form and added to HiGHS in one call."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.indices: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.nnz = 0

    def add(self, idx: np.ndarray, val: np.ndarray, lb: float, ub: float) -> None:
        keep = val != 0
        self.starts.append(self.nnz)
        self.indices.append(idx[keep])
        self.values.append(val[keep])
        self.nnz += int(keep.sum())
        self.lower.append(lb)
        self.upper.append(ub)

    def flush(self, h) -> None:
        if self.starts:
            h.addRows(len(self.starts), np.array(self.lower), np.array(self.upper), self.nnz,
                      np.array(self.starts, dtype=np.int32),
                      np.concatenate(self.indices).astype(np.int32), np.concatenate(self.values))


def _encode(h, chain: Chain, lo: np.ndarray, hi: np.ndarray, pre: list[tuple[Tensor, Tensor]],
            dense: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Add the network up to its last hidden layer to the HiGHS model ``h``; return the last
    hidden layer's activations as an affine map ``(E, c)`` of the columns (``a = E @ cols + c``)
    and the number of unstable units."""
    # Deferred: optional dependency (the `certified` extra): only the MILP bound needs it.
    import highspy

    inf = highspy.kHighsInf
    n_in = lo.size
    h.addVars(n_in, lo, hi)
    ncol = n_in
    e_mat = np.eye(n_in)          # activations as rows over the columns so far
    c_vec = np.zeros(n_in)
    unstable_total = 0
    for k, (w, b) in enumerate(dense[:-1]):
        z_mat = w @ e_mat                 # (m, ncol)
        z_c = w @ c_vec + b
        l_k = pre[k][0].flatten().double().cpu().numpy()
        u_k = pre[k][1].flatten().double().cpu().numpy()
        l_k = l_k - _WIDEN * (1 + np.abs(l_k))
        u_k = u_k + _WIDEN * (1 + np.abs(u_k))
        active, inactive = l_k >= 0, u_k <= 0
        unstable = np.flatnonzero(~active & ~inactive)
        m = w.shape[0]
        q = unstable.size
        unstable_total += q
        # new columns: a_r in [0, u_r] then d_r binary, for each unstable unit
        a_cols = ncol + 2 * np.arange(q)
        d_cols = a_cols + 1
        if q:
            col_lo = np.zeros(2 * q)
            col_hi = np.ones(2 * q)
            col_hi[0::2] = u_k[unstable]
            h.addVars(2 * q, col_lo, col_hi)
            h.changeColsIntegrality(q, d_cols.astype(np.int32),
                                    np.array([highspy.HighsVarType.kInteger] * q))
        ncol_new = ncol + 2 * q
        rows = _Rows()
        base_idx = np.arange(ncol)
        for t, r in enumerate(unstable):
            a, d = int(a_cols[t]), int(d_cols[t])
            # a - z >= 0  <=>  a - Z_r cols >= z_c
            rows.add(np.append(base_idx, a), np.append(-z_mat[r], 1.0), z_c[r], inf)
            # a - u d <= 0
            rows.add(np.array([a, d]), np.array([1.0, -u_k[r]]), -inf, 0.0)
            # a - z - l d <= -l  <=>  a - Z_r cols - l d <= z_c - l
            rows.add(np.append(base_idx, [a, d]), np.append(-z_mat[r], [1.0, -l_k[r]]), -inf,
                     z_c[r] - l_k[r])
        rows.flush(h)
        e_new = np.zeros((m, ncol_new))
        c_new = np.zeros(m)
        e_new[active, :ncol] = z_mat[active]
        c_new[active] = z_c[active]
        e_new[unstable, a_cols] = 1.0
        e_mat, c_vec, ncol = e_new, c_new, ncol_new
    return e_mat, c_vec, unstable_total


def _highs():
    # Deferred: optional dependency (the `certified` extra): only the MILP bound needs it.
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    return h


def milp_margin(chain: Chain, lo_in: Tensor, hi_in: Tensor, y: int,
                pre: list[tuple[Tensor, Tensor]], *, time_limit: float = 10.0,
                class_lower: Tensor | None = None, tol: float = TOL) -> MilpOutcome:
    """Minimise the margin of one sample over the box ``[lo_in, hi_in]`` (one sample, C x H x W).

    ``pre``: per ReLU layer the pre-activation bounds of this sample (shape of that layer).
    ``class_lower``: optional proven lower bounds of ``z_y - z_j`` (CROWN's, one per class, the
    label's entry ignored): classes already above ``tol`` are not solved, the others are solved
    lowest first. Stops, with the counterexample, as soon as a class with a margin below
    ``-tol`` is found; ``time_limit`` (seconds) is for the whole sample.
    """
    # Deferred: optional dependency (the `certified` extra): only the MILP bound needs it.
    import highspy

    start = time.perf_counter()
    dev = lo_in.device
    with torch.no_grad():
        dense = [tuple(t.detach().double().cpu().numpy() for t in seg.dense(dev, torch.float32))
                 for seg in chain.segments]
    w_last, b_last = dense[-1]
    num_classes = w_last.shape[0]
    known = {}
    if class_lower is not None:
        known = {j: float(class_lower[j]) for j in range(num_classes) if j != y}
    todo = sorted((j for j in range(num_classes) if j != y and known.get(j, -np.inf) <= tol),
                  key=lambda j: known.get(j, -np.inf))
    lower = min([v for j, v in known.items() if j not in todo], default=float("inf"))
    if not todo:
        return MilpOutcome(lower, None, True, time.perf_counter() - start, 0)

    builder = _highs()
    lo = lo_in.flatten().double().cpu().numpy()
    hi = hi_in.flatten().double().cpu().numpy()
    e_mat, c_vec, n_unstable = _encode(builder, chain, lo, hi, pre, dense)
    encoded = builder.getModel()
    ncol = e_mat.shape[1]

    def interrupt(event) -> None:  # decided: proven above tol, or a point below -tol
        out = event.data_out
        if out.mip_dual_bound > tol or out.mip_primal_bound < -tol:
            event.interrupt()

    x_adv, complete = None, True
    for j in todo:
        remaining = time_limit - (time.perf_counter() - start)
        if remaining <= 0:
            complete = False
            lower = min(lower, known.get(j, float("-inf")))
            continue
        # A fresh solver per class: an interrupted HiGHS instance stays interrupted.
        h = _highs()
        h.passModel(encoded)
        if hasattr(h, "cbMipInterrupt"):  # highspy >= 1.10; older ones solve to optimality
            h.cbMipInterrupt.subscribe(interrupt)
        cost = (w_last[y] - w_last[j]) @ e_mat
        h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), cost)
        h.changeObjectiveOffset(float((w_last[y] - w_last[j]) @ c_vec + b_last[y] - b_last[j]))
        h.setOptionValue("time_limit", float(remaining))
        h.run()
        info = h.getInfo()
        status = h.getModelStatus()
        dual = float(info.mip_dual_bound)
        if status == highspy.HighsModelStatus.kOptimal:
            dual = min(dual, float(info.objective_function_value)) if np.isfinite(dual) \
                else float(info.objective_function_value)
        if not np.isfinite(dual):
            dual = float("-inf")
        dual = max(dual, known.get(j, float("-inf")))  # CROWN's bound is proven too
        lower = min(lower, dual)
        if info.primal_solution_status >= 2 and info.objective_function_value < -tol:
            x_adv = np.asarray(h.getSolution().col_value[: lo.size], dtype=np.float64)
            break
        if dual <= tol:
            complete = False
    return MilpOutcome(lower, x_adv, complete if x_adv is None else True,
                       time.perf_counter() - start, n_unstable)
