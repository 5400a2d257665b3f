"""``unmask explain MODEL``: attribution maps of a model on clean and adversarial inputs.

Draws, for ``--n`` test images spread evenly over the test split, the input, a PGD adversarial example (unless
``--no-adversarial``), and each ``--method``'s map for both, and prints the deletion/insertion AUCs against
the random baseline, IG's completeness error and the clean-vs-adversarial attribution change.
The maps of both columns explain the true label, so the adversarial ones show what the attack
did to the evidence for it.

Usage: ``unmask explain mnist-cnn --method ig --method smoothgrad --n 8 --out fig.png``
"""

from __future__ import annotations

import argparse
import logging

import torch

from ...attacks import PGD
from ...explain.attribution import METHODS, Output, attribute, integrated_gradients, parse_method
from ...explain.metrics import attribution_change, deletion_insertion
from ...explain.plots import plot_attributions, plot_curves
from ..core import Norm, Threat, make_generator
from .attack import add_model_source_args, load_model, probe, test_data
from .base import CLIError, command, table

log = logging.getLogger(__name__)


def _alias(method: str) -> str:
    return ", ".join(a for a, m in METHODS.aliases().items() if m == method)


@command("explain")
def _explain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="attribution maps (Captum) of a model, clean and adversarial",
        description="Draw the input, its PGD adversarial example and each method's attribution "
                    "map for both, and print how faithful the maps are (deletion/insertion AUC "
                    "against a random ranking).")
    add_model_source_args(p)
    p.add_argument("--method", action="append", metavar="METHOD",
                   help="attribution method, repeatable: "
                        + ", ".join(f"{m} ({a})" if (a := _alias(m)) else m
                                    for m in METHODS.names()) + "; default ig")
    p.add_argument("--n", type=int, default=8, help="test images to explain (default 8)")
    p.add_argument("--out", required=True, help="figure path (PNG)")
    p.add_argument("--curves", help="also save the deletion/insertion curves to this path")
    p.add_argument("--output", default="logit", choices=[o.value for o in Output],
                   help="what is explained (default logit); log_probability shows what a "
                        "saturated loss (gradient masking) leaves of the maps")
    p.add_argument("--n-steps", type=int, default=32, help="IG integration steps (default 32)")
    p.add_argument("--samples", type=int, default=25, help="SmoothGrad samples (default 25)")
    p.add_argument("--noise-level", type=float, default=0.15,
                   help="SmoothGrad noise std as a share of the input range (default 0.15)")
    p.add_argument("--norm", default="linf", choices=[n.value for n in Norm],
                   help="PGD threat norm")
    p.add_argument("--eps", type=float,
                   help="PGD eps (default 0.3 linf / 2.0 l2 on MNIST-like data, 8/255 / 0.5 else)")
    p.add_argument("--attack-steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--no-adversarial", action="store_true", help="leave the adversarial columns out")
    p.add_argument("--seed", type=int, default=0, help="seed of noise, attack and random baseline")
    p.set_defaults(handler=_explain)


def _default_eps(dataset: str, norm: str) -> float:
    small = dataset.startswith("mnist") or dataset == "digits"
    if norm == "linf":
        return 0.3 if small else 8 / 255
    return 2.0 if small else 0.5


def _adversarial(model, x, y, norm: str, eps: float, steps: int, seed: int):
    """PGD adversarial examples of ``x`` at ``eps`` in ``norm``, ``steps`` steps."""
    # A CPU generator drives sampling on any device, so the seed gives the same attack anywhere.
    g = make_generator(seed)
    return PGD(Threat(norm, eps), steps=steps)(model, x, y, generator=g).x_adv


def _explain(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    methods = list(dict.fromkeys(parse_method(m) for m in (args.method or ["ig"])))
    loaded = load_model(args)
    model, device, dataset = loaded.model, loaded.device, loaded.dataset
    x_all, y_all = test_data(dataset, None)
    # Evenly spaced over the test split: mnist5k's test split is sorted by class, so the first
    # n images would all show one digit.
    idx = torch.linspace(0, len(y_all) - 1, min(args.n, len(y_all))).round().long()
    x, y = x_all[idx].to(device), y_all[idx].to(device)
    probe(model, x, y, args.model)

    def options(method):
        if method == "integrated_gradients":
            return {"n_steps": args.n_steps, "output": args.output}
        if method == "smoothgrad":
            return {"samples": args.samples, "noise_level": args.noise_level,
                    "generator": args.seed, "output": args.output}
        return {"output": args.output}

    x_adv = None
    if not args.no_adversarial:
        eps = args.eps if args.eps is not None else _default_eps(dataset, args.norm)
        x_adv = _adversarial(model, x, y, args.norm, eps, args.attack_steps, args.seed)
    with torch.no_grad():
        preds = model(x).argmax(1)
        adv_preds = model(x_adv).argmax(1) if x_adv is not None else None

    maps, adv_maps, curves, rows, ig = {}, {}, {}, [], None
    for m in methods:
        if m == "integrated_gradients":
            ig = integrated_gradients(model, x, y, **options(m))
            maps[m] = ig.attributions
        else:
            maps[m] = attribute(model, x, y, m, **options(m))
        res = deletion_insertion(model, x, maps[m], y, generator=args.seed)
        curves[m] = res
        row = [m, f"{res.deletion_auc.mean():.3f}", f"{res.random_deletion_auc.mean():.3f}",
               f"{res.insertion_auc.mean():.3f}", f"{res.random_insertion_auc.mean():.3f}"]
        if x_adv is not None:
            adv_maps[m] = attribute(model, x_adv, y, m, **options(m))
            change = attribution_change(model, x, x_adv, y, m, **options(m))
            row += [f"{change.topk_intersection.mean():.3f}",
                    f"{change.rank_correlation.mean():.3f}"]
        rows.append(row)

    title = f"{args.model}: {', '.join(maps)} ({args.output})"
    if x_adv is not None:
        title += f"; PGD {args.norm} eps={eps:g}, adversarial accuracy " \
                 f"{float((adv_preds == y).float().mean()):.2f}"
    out = plot_attributions(x, maps, args.out, x_adv=x_adv, adv_maps=adv_maps or None,
                            labels=y, preds=preds, adv_preds=adv_preds, title=title)
    header = ["method", "deletion_auc", "random", "insertion_auc", "random"]
    if x_adv is not None:
        header += ["top10%_kept_adv", "rank_corr_adv"]
    print(table(rows, header))
    if ig is not None:
        print(f"\nIG completeness at n_steps={args.n_steps}: |sum(IG) - (f(x) - f(0))| is "
              f"{ig.relative_error.mean():.2e} of |f(x) - f(0)| on average, "
              f"{ig.relative_error.max():.2e} at most")
    print(f"\nfigure: {out}")
    if args.curves:
        print(f"curves: {plot_curves(curves, args.curves, title=args.model)}")
    return 0
