"""Pure HTTP Range header parsing (RFC 9110 section 14), single byte range only."""

from __future__ import annotations

import re

from .errors import RangeNotSatisfiable

_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_DIGITS = 19  # more significant digits than this: past any image (int() refuses > 4300)
_HUGE = 10**_DIGITS


def _number(digits: str) -> int:
    """A decimal position; one longer than any image can be is _HUGE, never parsed whole."""
    digits = digits.lstrip("0") or "0"
    return _HUGE if len(digits) > _DIGITS else int(digits)


def _order(digits: str) -> tuple[int, str]:
    """Sorts decimal strings of any length as their numbers would."""
    digits = digits.lstrip("0") or "0"
    return len(digits), digits


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the inclusive (start, end) byte range a Range header asks for.

    None means "send the whole image with 200": no header, a syntactically invalid
    one, a unit other than bytes, or several ranges (which RFC 9110 lets a server
    ignore; a hypervisor never sends them). A well-formed range that selects no
    byte of the image raises RangeNotSatisfiable (416).
    """
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    m = _SPEC.match(spec)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = _number(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects no bytes", size)
        return max(0, size - n), size - 1
    if last and _order(last) < _order(first):
        return None
    start = _number(first)
    end = _number(last) if last else max(start, size - 1)
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts past the end ({size} bytes)", size)
    return start, min(end, size - 1)
