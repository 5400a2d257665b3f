"""``unmask backdoor MODEL``: a backdoored zoo entry's attack, detection and mitigation numbers.

Rebuilds the entry's poisoned training set from its recipe options, loads (or trains) the
model and its clean reference, runs :func:`unmask.defenses.backdoor_report.evaluate_backdoor`
and prints one table (or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json

import torch

from ...attacks.backdoor import Backdoor
from ...defenses.backdoor_report import evaluate_backdoor
from .. import data, zoo
from .attack import _json_object, add_model_source_args, load_model
from .base import CLIError, command, table


@command("backdoor")
def _backdoor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backdoor", help="attack success, poison detection, STRIP and fine-pruning of a "
                         "backdoored zoo model",
        description="Evaluate a backdoored zoo entry (recipe 'backdoor'): clean accuracy, attack "
                    "success rate, clean-accuracy cost versus its clean reference, spectral "
                    "signatures and activation clustering on the poisoned training set, STRIP "
                    "on test inputs, and fine-pruning.")
    add_model_source_args(p)
    p.add_argument("--backdoor", metavar="JSON", type=_json_object,
                   help="for a model that is not a zoo entry: how its training set was "
                        "poisoned, as the 'backdoor' recipe's options, e.g. '{\"trigger\": "
                        "\"badnets\", \"target\": 0, \"poison_rate\": 0.05, "
                        "\"poison_seed\": 0}' (unmask.attacks.backdoor.poison with that "
                        "seed on the dataset's train split)")
    p.add_argument("--reference", help="clean model for the accuracy cost: a zoo name, "
                                       "module:function or checkpoint (with --reference-arch; "
                                       "default: a zoo entry's clean_reference)")
    p.add_argument("--reference-arch", metavar="ARCH",
                   help="the architecture of a --reference checkpoint (as --arch)")
    p.add_argument("--no-defenses", action="store_true",
                   help="only the attack metrics (no detection, STRIP, fine-pruning)")
    p.add_argument("--clean-samples", type=int, default=1000,
                   help="clean training samples the defender fine-prunes with (default 1000)")
    p.add_argument("--strip-samples", type=int, default=500,
                   help="clean and triggered test images STRIP is measured on (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the defenders' draws (default 0)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=_backdoor)


def _accuracy(model, x, y, batch_size: int = 500) -> float:
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                   for i in range(0, len(y), batch_size))
    return hits / max(len(y), 1)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _backdoor(args: argparse.Namespace) -> int:
    if args.model in zoo.list():
        entry = zoo.get(args.model)
        if entry.recipe != "backdoor":
            backdoored = zoo.list(tag="backdoor")
            raise CLIError(f"{args.model!r} is not a backdoored zoo entry (recipe "
                           f"{entry.recipe!r}); backdoored entries: "
                           f"{', '.join(backdoored) or '(none)'}; a model of yours takes "
                           "--backdoor JSON")
        options = dict(entry.recipe_options)
        # The recipe draws the poisoned subset first from the entry's seed (or poison_seed).
        options.setdefault("poison_seed", entry.seed)
    elif args.backdoor is None:
        raise CLIError(f"{args.model!r} is not a zoo entry: say how its training set was "
                       "poisoned with --backdoor JSON (see --help)")
    else:
        options = dict(args.backdoor)
    loaded = load_model(args)
    reference = args.reference or options.get("clean_reference")
    try:
        backdoor = Backdoor.from_options(**options)
    except (TypeError, ValueError) as err:
        raise CLIError(f"--backdoor: {err}") from None
    x_train, y_train = data.load(loaded.dataset, "train")
    x_test, y_test = data.load(loaded.dataset, "test")
    poisoned = backdoor.poison(x_train, y_train, generator=int(options.get("poison_seed", 0)))
    model = loaded.model
    ref_acc = None
    if reference is not None:
        ref = load_model(argparse.Namespace(
            model=reference, arch=args.reference_arch, model_kwargs=None,
            dataset=loaded.dataset, device=args.device))
        ref_acc = (float(ref.card["clean_accuracy"]) if ref.card is not None
                   else _accuracy(ref.model, x_test.to(ref.device), y_test.to(ref.device)))
    run_defenses = not args.no_defenses
    report = evaluate_backdoor(model, backdoor, poisoned, x_test, y_test,
                               reference_accuracy=ref_acc, detect=run_defenses,
                               strip_inputs=run_defenses, mitigate=run_defenses,
                               clean_samples=args.clean_samples, strip_samples=args.strip_samples,
                               generator=args.seed)
    metrics = {"model": args.model, "trigger": backdoor.trigger.name, "mode": backdoor.mode.value,
               "target": backdoor.target, "reference": reference, **report.metrics()}
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(table([(k, _fmt(v)) for k, v in metrics.items()], ("metric", "value")))
    return 0
