"""Files: results and checkpoints written atomically (nothing half-written is ever left
behind), checkpoints read without unpickling, the cache root, JSON-safe values."""

from __future__ import annotations

import contextlib
import enum
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file as load_safetensors

__all__ = ["atomic_write", "json_safe", "write_between_markers", "read_state_dict", "cache_root",
           "safe_name"]


def cache_root() -> Path:
    """Where unmask caches trained models and prepared data: ``$UNMASK_CACHE``, by default
    ``~/.cache/unmask``. The zoo uses ``models/`` under it, the datasets ``data/``."""
    root = os.environ.get("UNMASK_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "unmask"


def safe_name(name: object) -> str:
    """``name`` as a file-name part: letters, digits, ``-``, ``_`` and ``.`` kept, anything
    else (``:``, ``/``, spaces) replaced by ``_``; ``"linf:0.3"`` becomes ``"linf_0.3"``."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def atomic_write(path: str | os.PathLike, payload: bytes | Callable[[IO[bytes]], Any], *,
                 fsync: bool = False) -> Path:
    """Write ``payload`` (bytes, or a function writing to a binary file) to ``path`` through a
    temporary file in the same folder and an atomic rename: readers see the old file or the
    new one, never a partial one. Creates the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp creates the file 0600; results and caches are readable like any file.
            with contextlib.suppress(OSError, AttributeError):
                os.fchmod(fh.fileno(), 0o644)
            if callable(payload):
                payload(fh)
            else:
                fh.write(payload)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def json_safe(obj: Any) -> Any:
    """``obj`` with tensors as lists, enums as values and NaN/Inf as None, ready for JSON."""

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_between_markers(path: str | os.PathLike, markers: tuple[str, str], text: str) -> None:
    """Replace what stands between the two ``markers`` in the file ``path`` by ``text``
    (atomically); the markers must occur exactly once (a generated table in a doc)."""

    path = Path(path)
    old = path.read_text()
    start, end = markers
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(old)) != 1:
        raise ValueError(f"{path} must contain the markers {start} ... {end} exactly once")
    atomic_write(path, pattern.sub(lambda _: f"{start}\n{text}{end}", old).encode())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects.

    Accepts ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and strips ``module.``
    prefixes left by DataParallel/DDP.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        state = load_safetensors(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"could not load {p} with weights_only=True ({type(err).__name__}: {err}); "
                "unmask never unpickles arbitrary objects: save a plain state_dict "
                "(torch.save(model.state_dict(), path)) or a .safetensors file"
            ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{p} does not hold a state dict (got {type(state).__name__})")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
