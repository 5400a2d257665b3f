"""Writing results and checkpoints so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "json_safe"]


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
    import enum

    import torch

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
    import re

    path = Path(path)
    old = path.read_text()
    start, end = markers
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(old)) != 1:
        raise ValueError(f"{path} must contain the markers {start} ... {end} exactly once")
    atomic_write(path, pattern.sub(lambda _: f"{start}\n{text}{end}", old).encode())
