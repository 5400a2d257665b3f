"""What channels_last, bf16 autocast and torch.compile change: speed and attack strength of
each variant of one model, measured interleaved in one process.

    python -m unmask.bench.perf.variants --model mnist-cnn --n 256 --eps 0.1 --json results/perf/variants.json

Variants: ``fp32`` (the model as given), ``channels_last``, ``channels_last+bf16``
(``Autocast(model, "bf16")``) and, with ``--compile``, ``channels_last+compile``
(``torch.compile(model, dynamic=True)``; its compilation is done in a warm-up round, not timed).
Each round measures every variant's R_fb and R_f and times PGD and Square on it; the rounds
are repeated and medians reported. Robust accuracy is always the fp32 model's verdict on the
``x_adv`` each variant's attack returned, so a variant that weakens the search shows as a
higher number, next to its speed-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn

from ...attacks import PGD, Square
from .. import data, zoo
from ..core import Autocast, Threat, margin, model_mode
from ..core.fileio import atomic_write
from ..zoo.registry import versions
from .harness import _timed, reference_rates

__all__ = ["variants", "main"]


def variants(model: nn.Module, *, compile_model: bool = False) -> dict[str, nn.Module]:
    """The model's variants by name; the original is left as it is."""
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = {"fp32": model, "channels_last": cl, "channels_last+bf16": Autocast(cl, "bf16")}
    if compile_model:
        out["channels_last+compile"] = torch.compile(cl, dynamic=True)
    return out


def main(argv=None) -> int:
    """Command line of the model-variant comparison (see the module docstring); returns the exit
    status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    parser.add_argument("--queries", type=int, default=500, help="Square queries (default 500)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also the torch.compile variant")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.n < 1:
        parser.error("--repeats and --n must be >= 1")

    model = zoo.load(args.model, device="cpu")
    x, y = data.load(zoo.get(args.model).dataset, "test", n=args.n)
    threat = Threat("linf", args.eps)
    attacks = {f"pgd-{args.steps}": PGD(threat, steps=args.steps),
               f"square-{args.queries}": Square(threat, queries=args.queries)}
    models = variants(model, compile_model=args.compile)
    rates = {v: {"R_fb": [], "R_f": []} for v in models}
    seconds = {v: {a: [] for a in attacks} for v in models}
    robust: dict[str, dict[str, float]] = {v: {} for v in models}

    def run(variant: nn.Module, attack):
        return attack(variant, x, y, generator=torch.Generator().manual_seed(0))

    for variant in models.values():  # warm-up (and compilation), not timed
        reference_rates(variant, x, y, iters=1)
        for attack in attacks.values():
            run(variant, attack)
    for r in range(args.repeats):
        for name, variant in models.items():
            fb, f = reference_rates(variant, x, y, iters=10)
            rates[name]["R_fb"].append(fb)
            rates[name]["R_f"].append(f)
            for label, attack in attacks.items():
                s, res = _timed(lambda a=attack, v=variant: run(v, a), x.device)
                seconds[name][label].append(s)
                with model_mode(model), torch.no_grad():  # the fp32 model's verdict
                    robust[name][label] = float((margin(model(res.x_adv), y) >= 0).float().mean())
        print(f"round {r + 1}/{args.repeats} done", flush=True)

    base = "fp32"
    med = statistics.median
    out = {"model": args.model, "n": args.n, "eps": args.eps, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "versions": versions(), "variants": {}}
    for name in models:
        entry = {"R_fb": med(rates[name]["R_fb"]), "R_f": med(rates[name]["R_f"]),
                 "R_fb_all": rates[name]["R_fb"], "R_f_all": rates[name]["R_f"], "attacks": {}}
        entry["R_fb_speedup"] = entry["R_fb"] / med(rates[base]["R_fb"])
        entry["R_f_speedup"] = entry["R_f"] / med(rates[base]["R_f"])
        for label in attacks:
            entry["attacks"][label] = {
                "seconds": med(seconds[name][label]), "seconds_all": seconds[name][label],
                "speedup": med(seconds[base][label]) / med(seconds[name][label]),
                "robust_accuracy_fp32_verdict": robust[name][label]}
        out["variants"][name] = entry

    print(f"\n{args.model} Linf {args.eps}, {args.n} samples, {out['threads']} threads, "
          f"medians of {args.repeats} interleaved rounds (robust accuracy: the fp32 model's "
          "verdict)\n")
    head = f"{'variant':<24}{'R_fb':>8}{'x':>6}{'R_f':>8}{'x':>6}"
    for label in attacks:
        head += f"{label + ' s':>16}{'x':>6}{'robust':>8}"
    print(head)
    for name, e in out["variants"].items():
        line = (f"{name:<24}{e['R_fb']:>8,.0f}{e['R_fb_speedup']:>6.2f}{e['R_f']:>8,.0f}"
                f"{e['R_f_speedup']:>6.2f}")
        for label in attacks:
            a = e["attacks"][label]
            line += f"{a['seconds']:>16.2f}{a['speedup']:>6.2f}{a['robust_accuracy_fp32_verdict']:>8.3f}"
        print(line)
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
