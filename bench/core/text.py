"""Plain-text tables for terminals and logs (the CLI, ``MaskingReport.table``, the
gradient-flow audit): one function, so every table in unmask lines up the same way."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table"]


def text_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell: the header, a rule of dashes, one line per row.

    ``None`` prints as an empty cell; trailing spaces are stripped. Example::

        >>> print(text_table([("pgd", 0.5)], ("attack", "robust")))
        attack  robust
        ------  ------
        pgd     0.5
    """
    cells = [[str(c) for c in header]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
