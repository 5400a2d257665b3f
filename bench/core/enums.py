"""String-valued enums, converted once at the public API (DESIGN rule 4)."""

from __future__ import annotations

import enum
from typing import Any

__all__ = ['StrEnum', 'parse_enum']


class StrEnum(str, enum.Enum):
    """A string enum that prints as its value: ``f"{Verdict.CLEAN}"`` is ``clean``, never
    ``Verdict.CLEAN`` (``enum.StrEnum`` of Python 3.11, here for 3.10 too)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def parse_enum(enum_cls: type[enum.Enum], value: Any, what: str) -> Any:
    """Convert ``value`` to ``enum_cls``; a bad value raises ``ValueError`` naming the valid ones."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower() if isinstance(value, str) else value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"unknown {what} {value!r}; expected one of {valid}") from None
