"""Writing the report's files: text and bytes atomically, figures (matplotlib, Agg, no display)
as PNG, and file-safe names."""

from __future__ import annotations

import io
from pathlib import Path

from ..core.fileio import atomic_write as _atomic_write

__all__ = ["write_text", "write_bytes"]


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    _atomic_write(Path(path), text.encode("utf-8"))
    return Path(path)


def _figure(_: Path | None = None):
    # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
    from matplotlib.figure import Figure

    return Figure(figsize=(7, 4), dpi=100)


def _save(fig, path: Path) -> Path:
    # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_bytes(path, buf.getvalue())


def write_bytes(path: Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically; returns the path."""
    _atomic_write(Path(path), payload)
    return Path(path)
