"""Formatting and parsing of durations and numbers as Knative annotations write them."""
from __future__ import annotations

import re


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def fmt_dur(s: float) -> str:
    s = float(s)
    if s == 0:
        return "0s"
    if s % 3600 == 0:
        return f"{int(s // 3600)}h"
    if s % 60 == 0:
        return f"{int(s // 60)}m"
    return f"{s:g}s"


def parse_duration(v: str | float | int) -> float:
    """Knative/Go duration ("90s", "5m", "1h30m", "1800s") or plain seconds -> seconds."""
    if isinstance(v, (int, float)):
        return float(v)
    text = str(v).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a duration: {v!r}")
    mult = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(a) * mult[b] for a, b in parts)
