"""``unmask attack``: run one attack or an ensemble preset on a zoo model and print the result."""

from __future__ import annotations

import argparse
import json
import time

from .cli import CLIError, _known, _table, command

ATTACK_CHOICES = ("fgsm", "pgd", "apgd", "apgd-t", "square", "quick", "standard")


def add_model_args(p: argparse.ArgumentParser, n: int = 1000, optional_model: bool = False
                   ) -> None:
    p.add_argument("model", metavar="MODEL", help="a zoo name (see: unmask zoo list)",
                   nargs="?" if optional_model else None)
    p.add_argument("--norm", default="linf", choices=("linf", "l2"))
    p.add_argument("--eps", type=float, default=0.3, help="threat radius (default 0.3)")
    p.add_argument("--n", type=int, default=n, help=f"test samples (default {n})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")


def load_model_and_data(args: argparse.Namespace):
    from . import data, zoo

    _known(args.model, zoo.list(), "model")
    if args.n <= 0:
        raise CLIError(f"--n must be positive, got {args.n}")
    model, card = zoo.load_with_card(args.model, device=args.device)
    device = next(model.parameters()).device
    x, y = data.load(zoo.get(args.model).dataset, "test", n=args.n)
    return model, card, x.to(device), y.to(device)


@command("attack")
def _attack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="attack a zoo model",
                       description="Run an attack or an ensemble preset on a zoo model's test "
                                   "split and print clean and robust accuracy.")
    add_model_args(p)
    p.add_argument("--attack", default="quick", choices=ATTACK_CHOICES,
                   help="an attack, or an ensemble preset (default quick)")
    p.add_argument("--steps", type=int, help="iterations (PGD/APGD) or queries (Square)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="search precision (autocast); verdicts stay the fp32 model's "
                        "(default fp32; see docs/performance.md)")
    p.add_argument("--batch-size", type=int, default=250, metavar="N",
                   help="ensemble presets: fixed batches, each seeded from (seed, batch), as in "
                        "suite runs (default 250, a suite's default): the same samples, batch "
                        "size, seed and preset give the suite's number")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(handler=_attack)


def _attack(args: argparse.Namespace) -> int:
    import torch

    from ..attacks import APGD, APGDT, FGSM, PGD, Square, attack_in_precision
    from .core import Threat
    from .zoo import fingerprint

    threat = Threat(args.norm, args.eps)
    model, card, x, y = load_model_and_data(args)
    model_fp = fingerprint(model)  # weights and structure, before any forward
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    if args.attack in ("quick", "standard"):
        summary = _evaluate_preset(args, model, x, y, threat)
        robust = summary["robust_accuracy"]
    else:
        kw = {} if args.steps is None else (
            {"queries": args.steps} if args.attack == "square" else {"steps": args.steps})
        attack = {"fgsm": lambda: FGSM(threat), "pgd": lambda: PGD(threat, **kw),
                  "apgd": lambda: APGD(threat, **kw), "apgd-t": lambda: APGDT(threat, **kw),
                  "square": lambda: Square(threat, **kw)}[args.attack]()
        with torch.no_grad():
            clean = (model(x).argmax(1) == y)
        result, rejected = attack_in_precision(attack, model, x, y, precision=args.precision,
                                               generator=g)
        robust = result.robust_accuracy()
        summary = {"attack": result.config, "n": len(y), "clean_accuracy": float(clean.float().mean()),
                   "robust_accuracy": robust, "forwards": result.n_forward,
                   "backwards": result.n_backward, "precision": args.precision,
                   "rejected": rejected}
    seconds = time.perf_counter() - start
    summary.update(model=args.model, sha256=card["sha256"] if card else None,
                   fingerprint=model_fp,
                   seed=args.seed, seconds=seconds)
    print(f"\n{args.model} {threat}: clean accuracy {summary['clean_accuracy']:.4f}, robust accuracy "
          f"{robust:.4f} on {len(y)} samples ({args.attack}, {seconds:.1f}s)")
    print(f"model fingerprint {model_fp[:12]} (weights and structure)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return 0


def _evaluate_preset(args: argparse.Namespace, model, x, y, threat) -> dict:
    """An ensemble preset through the suite's own evaluation (``runner.evaluate_cell`` and
    ``merge_cell``: the suite's batches and per-batch seeds), so ``unmask attack``, a suite and
    ``assert_robust_accuracy`` give the same number on the same samples and settings."""
    from ..attacks import Ensemble
    from .runner import evaluate_cell, merge_cell

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {args.batch_size}")
    ensemble = Ensemble.preset(args.attack, threat, precision=args.precision)
    parts = evaluate_cell(ensemble, model, x, y, seed=args.seed, batch_size=args.batch_size,
                          progress=True, desc=f"{args.model} {threat}", raise_errors=True)
    cells, samples = merge_cell(parts, ensemble.labels, y, model=args.model,
                                norm=threat.norm.value, eps=threat.eps, sha256=None,
                                source="cli")
    worst = cells[-1]
    reduced = args.precision != "fp32"
    rejected = {k: sum(p["costs"].get(k, {}).get("rejected", 0) for p in parts)
                for k in ensemble.labels}
    rows = [(c["attack"], c["attacked"], c["broken"], c["forwards"], c["backwards"],
             f"{c['wall_seconds']:.1f}") + ((rejected[c["attack"]],) if reduced else ())
            for c in cells[:-1]]
    print(_table(rows, ("attack", "attacked", "broken", "forwards", "backwards", "seconds")
                 + (("rejected",) if reduced else ())))
    broken: dict[str, int] = {}
    for r in samples:
        if r["broken_by"] is not None:
            broken[r["broken_by"]] = broken.get(r["broken_by"], 0) + 1
    return {"threat": threat.to_dict(), "n": worst["n"],
            "clean_accuracy": worst["clean_accuracy"],
            "robust_accuracy": worst["robust_accuracy"], "ci_low": worst["ci_low"],
            "ci_high": worst["ci_high"], "robust_accuracy_std": worst["robust_accuracy_std"],
            "stochastic": bool(worst["stochastic"]), "broken_by": dict(sorted(broken.items())),
            "costs": {c["attack"]: {k: c[k] for k in ("attacked", "broken", "forwards",
                                                      "backwards", "wall_seconds")}
                      for c in cells[:-1]},
            "config": ensemble.config(), "batch_size": args.batch_size,
            "samples": {"ids": [r["sample"] for r in samples],
                        "broken_by": [r["broken_by"] for r in samples]}}
