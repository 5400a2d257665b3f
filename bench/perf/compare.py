"""Head-to-head timing against torchattacks on the same model, inputs and settings.

    python -m unmask.bench.perf.compare --model mnist-cnn --n 256 --eps 0.3 --json results/compare.json

Measures, in one process and interleaved over ``--repeats`` rounds:

* PGD with identical eps, step size, steps and a random start: ``unmask.attacks.PGD`` vs
  ``torchattacks.PGD``;
* the whole evaluation: unmask's ``standard`` ensemble vs ``torchattacks.AutoAttack``
  (version "standard"), with robust accuracy of each (unmask's must be no higher).

``--precision bf16`` runs unmask's search under bf16 autocast (judged by the fp32 model, which
torchattacks attacks as is); ``--channels-last`` puts the shared model in channels_last for both.

torchattacks is not a dependency of unmask: ``pip install torchattacks`` to run this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ...attacks import PGD, Ensemble, attack_in_precision
from .. import data, zoo
from ..core import Threat
from ..core.fileio import atomic_write


def _time(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    """Command line of the torchattacks comparison (see the module docstring); returns the exit
    status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-autoattack", action="store_true")
    parser.add_argument("--channels-last", action="store_true",
                        help="the (shared) model in channels_last memory format")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="unmask's search precision (autocast); verdicts stay fp32")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    try:
        # Deferred: optional dependency: only this comparison needs it.
        import torchattacks
    except ImportError:
        parser.error("torchattacks is not installed: pip install torchattacks")

    model = zoo.load(args.model, device="cpu")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = data.load(zoo.get(args.model).dataset, "test", n=args.n)
    threat = Threat("linf", args.eps)
    alpha = 2.5 * args.eps / args.steps
    ours = PGD(threat, steps=args.steps, step_size=alpha)
    theirs = torchattacks.PGD(model, eps=args.eps, alpha=alpha, steps=args.steps,
                              random_start=True)
    t_ours, t_theirs, acc_ours, acc_theirs = [], [], None, None
    for r in range(args.repeats):
        s, (res, _) = _time(lambda r=r: attack_in_precision(
            ours, model, x, y, precision=args.precision, generator=torch.Generator().manual_seed(r)))
        t_ours.append(s)
        acc_ours = res.robust_accuracy  # the fp32 model's verdict, as for torchattacks
        with torch.random.fork_rng():  # torchattacks draws its start from the global RNG
            torch.manual_seed(r)
            s, x_adv = _time(lambda: theirs(x, y))
        t_theirs.append(s)
        with torch.no_grad():
            acc_theirs = float((model(x_adv).argmax(1) == y).float().mean())
    out = {"model": args.model, "n": args.n, "eps": args.eps, "steps": args.steps,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "channels_last": args.channels_last, "precision": args.precision,
           "torchattacks": torchattacks.__version__,
           "pgd": {"unmask_s": statistics.median(t_ours), "torchattacks_s": statistics.median(t_theirs),
                   "speedup": statistics.median(t_theirs) / statistics.median(t_ours),
                   "unmask_robust_accuracy": acc_ours, "torchattacks_robust_accuracy": acc_theirs,
                   "unmask_all_s": t_ours, "torchattacks_all_s": t_theirs}}
    print(f"PGD-{args.steps}: unmask {out['pgd']['unmask_s']:.2f}s (robust {acc_ours:.3f}) vs "
          f"torchattacks {out['pgd']['torchattacks_s']:.2f}s (robust {acc_theirs:.3f}): "
          f"{out['pgd']['speedup']:.2f}x")
    if not args.skip_autoattack:
        s_ours, ens = _time(lambda: Ensemble.preset("standard", threat, precision=args.precision)(
            model, x, y, generator=torch.Generator().manual_seed(0)))
        aa = torchattacks.AutoAttack(model, norm="Linf", eps=args.eps, version="standard",
                                     n_classes=10, seed=0)
        s_theirs, x_aa = _time(lambda: aa(x, y))
        with torch.no_grad():
            acc_aa = float((model(x_aa).argmax(1) == y).float().mean())
        out["standard"] = {"unmask_s": s_ours, "torchattacks_autoattack_s": s_theirs,
                           "speedup": s_theirs / s_ours,
                           "unmask_robust_accuracy": ens.robust_accuracy,
                           "unmask_costs": {k: c.to_dict() for k, c in ens.costs.items()},
                           "autoattack_robust_accuracy": acc_aa}
        print(f"standard ensemble: unmask {s_ours:.1f}s (robust {ens.robust_accuracy:.3f}) vs "
              f"torchattacks AutoAttack {s_theirs:.1f}s (robust {acc_aa:.3f}): "
              f"{s_theirs / s_ours:.2f}x")
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
