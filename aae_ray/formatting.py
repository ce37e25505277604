"""How numbers read in what aae-ray prints, in one place so that a metric looks the same in every command."""

from __future__ import annotations

import math
from typing import Any


def metric(x: Any, digits: int = 3) -> str:
    """A metric such as an AUROC: fixed digits, "n/a" where there is none (None, NaN, not a number)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return f"{x:.{digits}f}"
    return "n/a"


def short(v: Any) -> str:
    """A parameter value: three significant digits for a float, as it is otherwise."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)
