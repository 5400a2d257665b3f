"""Exact verification by mixed-integer linear programming (Tjeng, Xiao & Tedrake 2019).

Each unstable ReLU ``a = relu(z)`` with pre-activation bounds ``l < 0 < u`` (from CROWN) gets a
binary ``d`` and the big-M encoding ``a >= z, a >= 0, a <= u d, a <= z - l (1 - d)``; stable
ReLUs are fixed to ``0`` or ``z``. For each class ``j != y`` the margin ``z_y - z_j`` is minimised
over the input box (Linf ball ∩ [0, 1]) by HiGHS (``highspy``). The solver's dual bound is a
proven lower bound of the margin; a primal point with a negative margin is a counterexample,
which the caller re-checks on the model in fp32. Linf only: an L2 ball is not linear.
Cost: exponential in the number of unstable ReLUs; practical for MLPs of a few hundred units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .network import Chain

__all__ = ["MilpOutcome", "milp_margin"]


@dataclass(frozen=True)
class MilpOutcome:
    """``lower``: proven lower bound of ``min_j margin_j``; ``x_adv``: a point with negative margin
    (flattened input) or None; ``complete``: every class was solved to optimality."""

    lower: float
    x_adv: np.ndarray | None
    complete: bool
    seconds: float


def milp_margin(chain: Chain, lo_in: Tensor, hi_in: Tensor, y: int,
                pre: list[tuple[Tensor, Tensor]], *, time_limit: float = 10.0) -> MilpOutcome:
    """Minimise the margin of one sample over the box ``[lo_in, hi_in]`` (one sample, C x H x W).

    ``pre``: per ReLU layer the pre-activation bounds of this sample (shape of that layer).
    Stops early, with the counterexample, as soon as a class with negative margin is found.
    """
    import highspy

    start = time.perf_counter()
    dev = lo_in.device
    dense = [tuple(t.double() for t in seg.dense(dev, torch.float32)) for seg in chain.segments]
    w_last, b_last = dense[-1]
    lower, x_adv, complete = float("inf"), None, True
    num_classes = w_last.shape[0]
    for j in range(num_classes):
        if j == y:
            continue
        remaining = time_limit - (time.perf_counter() - start)
        if remaining <= 0:
            complete = False
            lower = min(lower, float("-inf"))
            break
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", float(remaining))
        h.setOptionValue("threads", 1)
        lo = lo_in.flatten().double().cpu().numpy()
        hi = hi_in.flatten().double().cpu().numpy()
        n_in = lo.size
        h.addVars(n_in, lo, hi)
        prev = np.arange(n_in)  # column indices of the current layer's activations
        ncol = n_in
        for k, (w, b) in enumerate(dense[:-1]):
            w_np, b_np = w.cpu().numpy(), b.cpu().numpy()
            l_k = pre[k][0].flatten().double().cpu().numpy()
            u_k = pre[k][1].flatten().double().cpu().numpy()
            m = w_np.shape[0]
            # z = W a_prev + b as columns with equality rows
            h.addVars(m, l_k, u_k)
            z_idx = np.arange(ncol, ncol + m)
            ncol += m
            for r in range(m):
                idx = np.concatenate([prev, [z_idx[r]]]).astype(np.int32)
                val = np.concatenate([w_np[r], [-1.0]])
                h.addRow(-b_np[r], -b_np[r], idx.size, idx, val)
            a_idx = np.empty(m, dtype=np.int64)
            for r in range(m):
                lr, ur = l_k[r], u_k[r]
                if ur <= 0:
                    h.addVar(0.0, 0.0)
                    a_idx[r] = ncol
                    ncol += 1
                elif lr >= 0:
                    a_idx[r] = z_idx[r]
                else:
                    h.addVar(0.0, ur)
                    a, d = ncol, ncol + 1
                    h.addVar(0.0, 1.0)
                    h.changeColIntegrality(d, highspy.HighsVarType.kInteger)
                    ncol += 2
                    zr = int(z_idx[r])
                    inf = highspy.kHighsInf
                    h.addRow(0.0, inf, 2, np.array([a, zr], np.int32), np.array([1.0, -1.0]))
                    h.addRow(-inf, 0.0, 2, np.array([a, d], np.int32), np.array([1.0, -ur]))
                    # a - z - l d <= -l
                    h.addRow(-inf, -lr, 3, np.array([a, zr, d], np.int32),
                             np.array([1.0, -1.0, -lr]))
                    a_idx[r] = a
            prev = a_idx
        w_np, b_np = w_last.cpu().numpy(), b_last.cpu().numpy()
        cost = w_np[y] - w_np[j]
        h.changeColsCost(prev.size, prev.astype(np.int32), cost)
        h.changeObjectiveOffset(float(b_np[y] - b_np[j]))
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        optimal = status == highspy.HighsModelStatus.kOptimal
        dual = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else float("-inf")
        if optimal:
            dual = min(dual, float(info.objective_function_value))
        else:
            complete = False
        lower = min(lower, dual)
        if info.primal_solution_status >= 2 and info.objective_function_value < 0:
            x_adv = np.asarray(h.getSolution().col_value[:n_in], dtype=np.float64)
            break
    return MilpOutcome(lower, x_adv, complete, time.perf_counter() - start)
