"""A run's code usage in plain words, from its pooled validation metrics.

Usage is judged against its ceiling: the number of distinct codes that uniform use would
show for the vectors the validation pass actually quantized (``used_codes_ceiling``,
:func:`~fairseq_knnvq.quantization.uniform_usage_ceiling`). A pass over 1,000 vectors of
a 320-entry group shows about 306 codes even under perfectly uniform use, so a verdict
against M would call such a codebook partly used. Records written before the ceiling was
logged are judged against M (G * M entries).

The thresholds: full use from FULL_USE of the ceiling, collapsed below COLLAPSED of it,
partial use in between; loose when the smoothed vectors put on average less than TIGHT
on their largest entry (``tightness_max_prob``).
"""

from __future__ import annotations

from typing import Mapping, Optional

FULL_USE = 0.95
COLLAPSED = 0.5
TIGHT = 0.5


def verdict(metrics: Mapping[str, float]) -> str:
    """``"collapsed: 11 of 64 codes (expected 64 under uniform use)"``, ``"partial use:
    561 of 640 codes (expected 627 under uniform use)"``, ``"loose: mean max p 0.40"``
    or ``"full use, tight"`` (usage and tightness can both fail: usage is named first);
    ``"-"`` without usage metrics."""
    if "code_usage" not in metrics:
        return "-"
    usage = float(metrics["code_usage"])
    used: Optional[float] = metrics.get("used_codes")
    ceiling: Optional[float] = metrics.get("used_codes_ceiling")
    problems = []
    if ceiling is not None and used is not None and ceiling > 0:
        share = used / ceiling
        if share < FULL_USE:
            word = "collapsed" if share < COLLAPSED else "partial use"
            problems.append(
                f"{word}: {used:.0f} of {usage_total(usage, used)} codes (expected {ceiling:.0f} under uniform use)"
            )
    elif usage < FULL_USE:
        total = usage_total(usage, used)
        word = "collapsed" if usage < COLLAPSED else "partial use"
        problems.append(f"{word}: {used:.0f} of {total} codes" if total else f"{word}: usage {usage:.2f}")
    max_p = metrics.get("tightness_max_prob")
    if max_p is not None and max_p < TIGHT:
        problems.append(f"loose: mean max p {max_p:.2f}")
    return "; ".join(problems) or "full use, tight"


def usage_total(usage: float, used: Optional[float]) -> Optional[int]:
    """G * M from the share used and the count used (None when it cannot be told)."""
    return round(used / usage) if used and usage > 0 else None
