"""Training recipes and the loop they share.

A recipe is a plain function ``recipe(model, x, y, *, epochs, batch_size, lr, generator,
progress, checkpoint_dir, **options) -> model`` registered with ``@register_recipe(name)``.
The zoo looks recipes up by name, so defenses (adversarial training, gradient penalties) plug
in by registering theirs; the zoo itself never changes.

Most recipes only differ in the per-batch loss: they call :func:`fit` with a ``loss_fn``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .fileio import atomic_write
from .registry import Registry
from .seeding import make_generator

__all__ = ["RECIPES", "Recipe", "register_recipe", "fit", "standard", "accuracy", "predict",
           "seeded_init"]

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]


@dataclass(frozen=True)
class Recipe:
    """A registered training recipe: calling it calls ``fn``; ``label`` names it in the
    report's defense column (``"PGD-AT"``)."""

    name: str
    fn: Callable[..., Any]
    label: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


RECIPES: Registry[Recipe] = Registry("training recipe")


def register_recipe(name: str, *, label: str | None = None, **kwargs: Any) -> Callable:
    """Register ``fn(model, x, y, *, epochs, ...)`` as training recipe ``name`` (``label``:
    its name in the report, default ``name``). Usage: ``@register_recipe("my-at", label="My
    AT")`` above the function."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        RECIPES.add(name, Recipe(name, fn, label or name), **kwargs)
        return fn

    return deco


class seeded_init:  # noqa: N801 - used like a function in a with-statement
    """``with seeded_init(seed): model = Net()`` initialises parameters from ``seed`` without
    leaving any trace on the global RNG (it is forked and restored)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self):
        self._fork.__enter__()
        # Only the CPU generator: parameters are initialised on the CPU, and torch.manual_seed
        # would also reseed the CUDA generators, which fork_rng(devices=[]) does not restore.
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted labels of ``x`` in eval mode (mode restored), batched, on the model's device."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        preds = [model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                 for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(preds)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Clean accuracy in [0, 1]."""
    return float((predict(model, x, batch_size) == y.cpu()).float().mean())


def fit(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, *, epochs: int,
        batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
        optimizer: str = "adam", generator: torch.Generator | int | None = 0,
        progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
        desc: str = "train", on_batch: Callable[[float], None] | None = None) -> nn.Module:
    """Train ``model`` on ``(x, y)`` minimising ``loss_fn(model, xb, yb, generator)``.

    Batches are shuffled with ``generator``. With ``checkpoint_dir``, model, optimiser and
    generator state are saved (atomically) after every epoch and an interrupted run resumes
    from the last finished epoch. The learning rate follows a cosine schedule.

    ``on_batch(progress)`` is called before every batch with the training progress in epochs
    (``epoch + batch / batches_per_epoch``), also after a resume, so schedules that live in
    the loss (an eps warm-up) need no state of their own in the checkpoint.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = make_generator(generator)
    device = next(model.parameters()).device
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay,
                              nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adam' or 'sgd'")
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))

    start = 0
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if ckpt.exists():
            # On the CPU: the generator state must stay a CPU ByteTensor; model and optimiser
            # state are copied to their parameters' device by load_state_dict.
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            start = int(state["epoch"])
            log.info("resuming %s from epoch %d of %d", desc, start, epochs)

    model.train()
    # disable=None: tqdm draws only on a terminal, so CI logs are not flooded.
    bar = tqdm(total=(epochs - start) * steps_per_epoch, desc=desc,
               disable=None if progress else True, leave=False, unit="batch")
    for epoch in range(start, epochs):
        order = torch.randperm(len(x), generator=generator)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            if on_batch is not None:
                on_batch(epoch + b / steps_per_epoch)
            loss = loss_fn(model, xb, yb, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if progress and b % 20 == 0:
                # Reading the loss syncs with the device, so only every 20th batch.
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{float(loss.detach()):.3f}")
        if ckpt is not None:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "generator": generator.get_state(),
                     "epoch": epoch + 1}
            atomic_write(ckpt, lambda fh, state=state: torch.save(state, fh))
    bar.close()
    model.eval()
    return model


def cross_entropy_loss(model: nn.Module, xb: Tensor, yb: Tensor, generator) -> Tensor:
    """The standard training loss ``CE(model(xb), yb)`` (the ``generator`` is unused)."""
    return F.cross_entropy(model(xb), yb)


@register_recipe("standard", label="standard training")
def standard(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128,
             lr: float = 1e-3, generator=0, progress: bool = True, checkpoint_dir=None,
             **options) -> nn.Module:
    """Standard (non-robust) training: cross-entropy, Adam, cosine learning rate."""
    return fit(model, x, y, cross_entropy_loss, epochs=epochs, batch_size=batch_size, lr=lr,
               generator=generator, progress=progress, checkpoint_dir=checkpoint_dir,
               desc="standard", **options)
