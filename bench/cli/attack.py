"""``unmask attack``: run one attack or an ensemble preset on a zoo model and print the result."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch

from ...attacks import ATTACKS, PRESETS, Ensemble, attack_in_precision
from .. import data
from ..core import Norm, Precision, Threat
from ..suite.runner import evaluate_cell, merge_cell, probe_model
from ..zoo.archs import ARCHS
from ..zoo.registry import fingerprint
from ..zoo.resolve import ModelSourceError
from ..zoo.resolve import load_model as _load
from .base import CLIError, command, table


def standalone_attacks() -> list[str]:
    """The registered attacks built from a threat alone (``Cls(threat, **defaults)``); the
    wrappers (EOT, BPDA, transfer) and attacks with required settings need a suite entry."""
    out = []
    for name, cls in ATTACKS.items():
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if params and params[0].name == "threat" and all(
                p.default is not inspect.Parameter.empty for p in params[1:]):
            out.append(name)
    return out


def attack_choices() -> list[str]:
    """``--attack``'s choices: the standalone attacks, then the ensemble presets."""
    return [*standalone_attacks(), *PRESETS.names()]


MODEL_HELP = ("a zoo name (unmask zoo list), package.module:function (a builder of yours, "
              "imported from the working directory), or a checkpoint file (.pt, .pth, .ckpt, "
              ".bin, .safetensors: a state dict with --arch, or a TorchScript archive), or "
              "robustbench:DATASET/THREAT/NAME (a local RobustBench-style checkpoint; "
              "--model-kwargs '{\"model_dir\": ...}')")


def add_model_source_args(p: argparse.ArgumentParser, optional_model: bool = False) -> None:
    """MODEL and the options that say how to build it (every single-model command)."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP,
                   nargs="?" if optional_model else None)
    p.add_argument("--arch", metavar="ARCH",
                   help=f"the architecture of a checkpoint of weights: a registered one "
                        f"({', '.join(ARCHS.names())}), tv:NAME, or package.module:function")
    p.add_argument("--model-kwargs", metavar="JSON", type=_json_object, default=None,
                   help="keyword arguments of the builder or of --arch, as a JSON object")
    p.add_argument("--dataset", metavar="NAME",
                   help="the dataset of a model that is not a zoo entry (default mnist5k; "
                        "unmask data list)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser, n: int = 1000, optional_model: bool = False
                   ) -> None:
    """Add the model source options and ``--norm``, ``--eps`` (default 0.3), ``--n`` (default
    ``n``, capped at the test split) and ``--seed`` to a sub-command's parser.
    """
    add_model_source_args(p, optional_model)
    p.add_argument("--norm", default="linf", choices=[n.value for n in Norm])
    p.add_argument("--eps", type=float, default=0.3, help="threat radius (default 0.3)")
    p.add_argument("--n", type=int, default=None,
                   help=f"test samples (default {n}, or the whole test split when smaller; "
                        "more than the split holds is an error)")
    p.set_defaults(default_n=n)
    p.add_argument("--seed", type=int, default=0)


def load_model(args: argparse.Namespace):
    """The :class:`~unmask.bench.zoo.resolve.LoadedModel` that MODEL names (errors: CLIError)."""

    try:
        return _load(args.model, arch=args.arch, kwargs=args.model_kwargs,
                     dataset=args.dataset, device=args.device, progress=True)
    except ModelSourceError as err:
        raise CLIError(str(err)) from None


def test_data(dataset: str, n: int | None, default_n: int | None = None):
    """The first ``n`` test samples of ``dataset`` (``n`` None: ``default_n`` or the split)."""

    if n is not None and n <= 0:
        raise CLIError(f"--n must be positive, got {n}")
    try:
        if n is None:
            x, y = data.load(dataset, "test")
            return (x, y) if default_n is None else (x[:default_n], y[:default_n])
        return data.load(dataset, "test", n=n)
    except ValueError as err:
        raise CLIError(str(err)) from None


def load_model_and_data(args: argparse.Namespace):
    """``(model, card, x, y)``: MODEL on its device and its dataset's first test samples; the
    threat (``--norm``/``--eps``) is judged against the inputs (eps above the box's diameter
    is an error, from half of it a warning)."""

    loaded = load_model(args)
    x, y = test_data(loaded.dataset, args.n, getattr(args, "default_n", None))
    if loaded.source != "zoo":
        print(f"{args.model}: {loaded.source} model, evaluated on {loaded.dataset} (test, "
              f"{len(y)} samples)", file=sys.stderr)
    if getattr(args, "eps", None) is not None:
        try:
            Threat(args.norm, args.eps).check_for(x)
        except ValueError as err:
            raise CLIError(str(err)) from None
    probe(loaded.model, x[:8].to(loaded.device), y[:8].to(loaded.device), args.model)
    return loaded.model, loaded.card, x.to(loaded.device), y.to(loaded.device)


def probe(model, x, y, name: str) -> None:
    """One forward pass: finite ``N x K`` logits covering the labels, else a CLIError."""

    try:
        probe_model(model, x, y, name)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None
    except RuntimeError as err:  # e.g. a first layer for other inputs than the dataset's
        raise CLIError(f"model {name!r} failed on a batch of inputs of shape "
                       f"{tuple(x.shape)}: {err} (is --dataset right?)") from None


@command("attack")
def _attack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="attack a model (zoo, module:function or checkpoint)",
                       description="Run an attack or an ensemble preset on a model's test "
                                   "split and print clean and robust accuracy.")
    add_model_args(p)
    p.add_argument("--attack", default="quick", choices=attack_choices(),
                   help=f"an attack ({', '.join(standalone_attacks())}) or an ensemble preset "
                        f"({', '.join(PRESETS.names())}); default quick")
    p.add_argument("--steps", type=int,
                   help="iterations (attacks with steps) or queries (attacks with queries)")
    p.add_argument("--precision", default="fp32", choices=[v.value for v in Precision],
                   help="search precision (autocast); verdicts stay the fp32 model's "
                        "(default fp32; see docs/performance.md)")
    p.add_argument("--batch-size", type=int, default=250, metavar="N",
                   help="ensemble presets: fixed batches, each seeded from (seed, batch), as in "
                        "suite runs (default 250, a suite's default): the same samples, batch "
                        "size, seed and preset give the suite's number")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(handler=_attack)


def _attack(args: argparse.Namespace) -> int:

    try:
        threat = Threat(args.norm, args.eps)
    except ValueError as err:
        raise CLIError(str(err)) from None
    model, card, x, y = load_model_and_data(args)
    model_fp = fingerprint(model)  # weights and structure, before any forward
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    if args.attack in PRESETS:
        summary = _evaluate_preset(args, model, x, y, threat)
        robust = summary["robust_accuracy"]
    else:
        cls = ATTACKS.get(args.attack)
        params = inspect.signature(cls.__init__).parameters
        budget = next((k for k in ("steps", "queries") if k in params), None)
        kw = {} if args.steps is None or budget is None else {budget: args.steps}
        attack = cls(threat, **kw)
        with torch.no_grad():
            clean = (model(x).argmax(1) == y)
        result, rejected = attack_in_precision(attack, model, x, y, precision=args.precision,
                                               generator=g)
        robust = result.robust_accuracy
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
    rejected = {k: sum(c.rejected for c in (p.cost(k) for p in parts) if c is not None)
                for k in ensemble.labels}
    rows = [(c["attack"], c["attacked"], c["broken"], c["forwards"], c["backwards"],
             f"{c['wall_seconds']:.1f}") + ((rejected[c["attack"]],) if reduced else ())
            for c in cells[:-1]]
    print(table(rows, ("attack", "attacked", "broken", "forwards", "backwards", "seconds")
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
