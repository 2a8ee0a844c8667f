"""Small validators that every config dataclass of ``pipeline/`` and ``model/`` shares (and ``jobs/`` may use).

Why one home: "a positive int" means the same thing for a frame count, a batch size or a stride — an ``int``
at or above a bound, never a ``bool`` (``True`` is an ``int`` to Python but no count a user means) — and the
error names the field. Dependency-free, so any layer can import it.
"""

from __future__ import annotations


def positive_int(name: str, value: object, *, low: int = 1) -> int:
    """``value`` if it is an ``int >= low`` (not a ``bool``); otherwise ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value
