"""``unmask zoo list|train|info`` and ``unmask data list``: the model zoo and the datasets."""

from __future__ import annotations

import argparse
import json
import time

from .. import data, zoo
from .base import command, known, table

__all__: list[str] = []


# --- zoo -------------------------------------------------------------------------------------


@command("zoo")
def _zoo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list and train the model zoo",
                       description="List the model zoo, or train (and cache) an entry.")
    zsub = p.add_subparsers(dest="zoo_cmd", metavar="{list,train,info}")
    zsub.required = True
    lp = zsub.add_parser("list", help="list zoo entries and whether they are cached")
    lp.add_argument("--tag", help="only entries with this tag")
    lp.set_defaults(handler=_zoo_list)
    tp = zsub.add_parser("train", help="train an entry (cache hit if already trained)")
    tp.add_argument("names", nargs="+", metavar="NAME")
    tp.add_argument("--retrain", action="store_true", help="train again even if cached")
    tp.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    tp.set_defaults(handler=_zoo_train)
    ip = zsub.add_parser("info", help="print an entry's card (JSON)")
    ip.add_argument("name", metavar="NAME")
    ip.set_defaults(handler=_zoo_info)


def _zoo_list(args: argparse.Namespace) -> int:
    rows = []
    for e in zoo.entries():
        if args.tag and args.tag not in e.tags:
            continue
        c = zoo.card(e.name)
        fresh = c is not None and c.get("fingerprint") == e.fingerprint()
        acc = f"{c['clean_accuracy']:.4f}" if fresh else ""
        rows.append((e.name, e.dataset, e.recipe, e.base or "", acc, e.description))
    print(table(rows, ("name", "dataset", "recipe", "base", "clean_acc", "description")))
    print(f"\ncache: {zoo.cache_dir()}")
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    for name in args.names:
        known(name, zoo.list(), "model")
    for name in args.names:
        start = time.perf_counter()
        _, card = zoo.load_with_card(name, device=args.device, retrain=args.retrain)
        took = time.perf_counter() - start
        print(f"{name}: clean accuracy {card['clean_accuracy']:.4f} on {card['test_samples']} "
              f"test images; trained in {card['train_seconds']:.1f}s; sha256 {card['sha256'][:12]}"
              f" ({'trained' if took > 0.5 * card['train_seconds'] and card['train_seconds'] > 0 else 'cached'}"
              f", {took:.2f}s)")
    return 0


def _zoo_info(args: argparse.Namespace) -> int:
    known(args.name, zoo.list(), "model")
    c = zoo.card(args.name)
    if c is None:
        print(json.dumps(zoo.get(args.name).config(), indent=2, default=str))
        print(f"\n{args.name} is not trained yet: unmask zoo train {args.name}")
    else:
        print(json.dumps(c, indent=2, sort_keys=True))
    return 0


# --- data ------------------------------------------------------------------------------------


@command("data")
def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list datasets")
    dsub = p.add_subparsers(dest="data_cmd", metavar="{list}")
    dsub.required = True
    lp = dsub.add_parser("list", help="list registered datasets")
    lp.set_defaults(handler=_data_list)


def _data_list(args: argparse.Namespace) -> int:
    rows = []
    for name in data.names():
        d = data.info(name)
        shape = "x".join(map(str, d.shape))
        rows.append((name, shape, d.num_classes or "any", "yes" if d.offline else "no",
                     d.description))
    print(table(rows, ("name", "shape", "classes", "offline", "description")))
    return 0


