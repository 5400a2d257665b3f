"""The device sweep of the performance issue: batch size x memory layout x precision on a
CIFAR-sized PreActResNet-18, with host-sync counts on CUDA.

    python -m unmask.bench.perf.sweep --device cuda --json results/perf/sweep-gpu.json

For every batch size (default 64, 512, 4096), layout (contiguous, channels_last) and precision
(fp32, bf16 autocast) it measures R_fb and R_f, times PGD-10 (efficiency = gradient evaluations
per second / R_fb) and reports its robust accuracy as the fp32 model's verdict
(:func:`unmask.attacks.attack_in_precision`). On CUDA it counts the synchronisations
``torch.cuda.set_sync_debug_mode("warn")`` reports during the attack, per step; unmask reads
the host only at its compaction points, so the count stays O(log steps + 20) per attack.

The model: ``--checkpoint PATH`` (a state dict for ``--arch``), or the architecture trained
for ``--train-epochs`` on mnist5k resized to 3 x 32 x 32 (nothing is downloaded), so robust
accuracy means something. Batches larger than the test split repeat its samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attacks import PGD, attack_in_precision
from .. import data
from ..core import Autocast, Threat, make_generator, select_device
from ..core.fileio import atomic_write
from ..zoo.registry import build_arch, from_checkpoint, versions
from .harness import _sync, _timed, reference_rates

__all__ = ["main", "count_syncs", "cifar_sized"]


def cifar_sized(x: Tensor) -> Tensor:
    """1 x 28 x 28 images as 3 x 32 x 32 (bilinear resize, grey repeated on 3 channels)."""
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1) \
        .repeat(1, 3, 1, 1)


def count_syncs(fn, device: torch.device) -> tuple[int | None, object]:
    """(host synchronisations CUDA reports while ``fn`` runs, ``fn()``); None off CUDA."""
    if device.type != "cuda":
        return None, fn()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower()), out


def _train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
    g = make_generator(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128].to(x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def main(argv=None) -> int:
    """Command line of the device sweep (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="preact-resnet18")
    parser.add_argument("--width", type=int, help="base width of the ResNet (default its own)")
    parser.add_argument("--checkpoint", help="a state dict for --arch (else: train briefly)")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--batches", default="64,512,4096")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="cuda, cpu, mps (default: best available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.repeats < 1 or args.steps < 1:
        parser.error("--batches, --repeats and --steps must be positive")

    device = select_device(args.device)
    kwargs = {} if args.width is None else {"width": args.width}
    torch.manual_seed(args.seed)  # the architecture's own initialisation
    if args.checkpoint:
        model = from_checkpoint(args.checkpoint, args.arch, device=device, **kwargs)
    else:
        model = build_arch(args.arch, **kwargs).to(device)
        if args.train_epochs > 0:
            xt, yt = data.load("mnist5k", "train")
            start = time.perf_counter()
            _train(model, cifar_sized(xt).to(device), yt.to(device), args.train_epochs,
                   args.seed)
            print(f"trained {args.arch} for {args.train_epochs} epochs on mnist5k at 3x32x32 "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    x_all, y_all = data.load("mnist5k", "test")
    x_all, y_all = cifar_sized(x_all), y_all
    layouts = {"contiguous": model,
               "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}
    threat = Threat("linf", args.eps)
    pgd = PGD(threat, steps=args.steps)
    rows = []
    for batch in batches:
        reps = -(-batch // len(y_all))
        x = x_all.repeat(reps, 1, 1, 1)[:batch].to(device)
        y = y_all.repeat(reps)[:batch].to(device)
        for layout, net in layouts.items():
            for precision in ("fp32", "bf16"):
                def attack(net=net, precision=precision, x=x, y=y):
                    return attack_in_precision(pgd, net, x, y, precision=precision,
                                               generator=make_generator(args.seed))

                timed = net if precision == "fp32" else Autocast(net, precision)
                syncs, (res, rejected) = count_syncs(attack, device)  # also the warm-up
                fb, f, secs = [], [], []
                for _ in range(args.repeats):
                    a, b = reference_rates(timed, x, y, iters=5)
                    fb.append(a)
                    f.append(b)
                    s, _ = _timed(attack, device)
                    secs.append(s)
                _sync(device)
                r_fb = statistics.median(fb)
                seconds = statistics.median(secs)
                row = {"batch": batch, "layout": layout, "precision": precision,
                       "R_fb": r_fb, "R_f": statistics.median(f), "pgd_seconds": seconds,
                       "pgd_efficiency": res.n_backward / seconds / r_fb,
                       "robust_accuracy": res.robust_accuracy, "rejected": rejected,
                       "syncs": syncs,
                       "syncs_per_step": None if syncs is None else syncs / args.steps}
                rows.append(row)
                print(f"batch {batch:>5} {layout:<14}{precision:<6}R_fb {r_fb:>10,.0f} "
                      f"R_f {row['R_f']:>10,.0f}  PGD-{args.steps} {seconds:7.3f} s  "
                      f"efficiency {row['pgd_efficiency']:.2f}  robust {row['robust_accuracy']:.3f}"
                      + ("" if syncs is None else f"  syncs/step {row['syncs_per_step']:.1f}"),
                      flush=True)
    out = {"arch": args.arch, "kwargs": kwargs, "checkpoint": args.checkpoint,
           "train_epochs": 0 if args.checkpoint else args.train_epochs, "eps": args.eps,
           "steps": args.steps, "repeats": args.repeats, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "threads": torch.get_num_threads(), "versions": versions(), "rows": rows}
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
