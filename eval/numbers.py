"""Numbers as people write them in recipes and reports."""
from __future__ import annotations


def number_text(value: float) -> str:
    """Numbers as people write them in recipes: 32 not 32.0, 1e-4 not 0.0001."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.12e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return repr(float(value))
