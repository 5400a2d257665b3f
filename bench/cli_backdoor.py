"""``unmask backdoor MODEL``: a backdoored zoo entry's attack, detection and mitigation numbers.

Rebuilds the entry's poisoned training set from its recipe options, loads (or trains) the
model and its clean reference, runs :func:`unmask.defenses.backdoor_report.evaluate_backdoor`
and prints one table (or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json

from .cli import CLIError, _known, _table, command


@command("backdoor")
def _backdoor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backdoor", help="attack success, poison detection, STRIP and fine-pruning of a "
                         "backdoored zoo model",
        description="Evaluate a backdoored zoo entry (recipe 'backdoor'): clean accuracy, attack "
                    "success rate, clean-accuracy cost versus its clean reference, spectral "
                    "signatures and activation clustering on the poisoned training set, STRIP "
                    "on test inputs, and fine-pruning.")
    p.add_argument("model", metavar="MODEL", help="a backdoored zoo entry, e.g. mnist-cnn-badnets")
    p.add_argument("--reference", help="clean zoo entry for the accuracy cost "
                                       "(default: the entry's clean_reference)")
    p.add_argument("--no-defenses", action="store_true",
                   help="only the attack metrics (no detection, STRIP, fine-pruning)")
    p.add_argument("--clean-samples", type=int, default=1000,
                   help="clean training samples the defender fine-prunes with (default 1000)")
    p.add_argument("--strip-samples", type=int, default=500,
                   help="clean and triggered test images STRIP is measured on (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the defenders' draws (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=_backdoor)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _backdoor(args: argparse.Namespace) -> int:
    from ..attacks.backdoor import Backdoor
    from ..defenses.backdoor_report import evaluate_backdoor
    from . import data, zoo

    _known(args.model, zoo.list(), "model")
    entry = zoo.get(args.model)
    backdoored = zoo.list(tag="backdoor")
    if entry.recipe != "backdoor":
        raise CLIError(f"{args.model!r} is not a backdoored zoo entry (recipe {entry.recipe!r}); "
                       f"backdoored entries: {', '.join(backdoored) or '(none)'}")
    options = dict(entry.recipe_options)
    reference = args.reference or options.get("clean_reference")
    if reference is not None:
        _known(reference, zoo.list(), "model")
    backdoor = Backdoor.from_options(**options)
    poison_seed = options.get("poison_seed")
    x_train, y_train = data.load(entry.dataset, "train")
    x_test, y_test = data.load(entry.dataset, "test")
    # The recipe draws the poisoned subset first from the entry's seed (or poison_seed).
    poisoned = backdoor.poison(x_train, y_train,
                               generator=poison_seed if poison_seed is not None else entry.seed)
    model = zoo.load(args.model, device=args.device)
    ref_acc = None
    if reference is not None:
        _, ref_card = zoo.load_with_card(reference, device=args.device)
        ref_acc = float(ref_card["clean_accuracy"])
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
    print(_table([(k, _fmt(v)) for k, v in metrics.items()], ("metric", "value")))
    return 0
