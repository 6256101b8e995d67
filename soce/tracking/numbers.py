"""Scores as users read them: fractions in [0, 1] are stored, percent with 2 decimals is shown;
one rounding (half up on the decimal form) for logs, metrics and reports."""

from __future__ import annotations

import logging
from decimal import ROUND_HALF_UP, Decimal

log = logging.getLogger(__name__)

SCORE_DECIMALS = 4  # fractions logged with 4 decimals = percent with 2 decimals in every report


def percent(fraction: float) -> float:
    """A fraction as percent rounded to 2 decimals, half up on its decimal form (0.15975 -> 15.98)."""
    if fraction != fraction:  # NaN
        return fraction
    return float(Decimal(repr(float(fraction))).scaleb(2).quantize(Decimal("0.01"), ROUND_HALF_UP))


def score(fraction: float) -> float:
    """A fraction rounded as it is logged: ``percent(score(x)) == percent(x)`` for every x."""
    if fraction != fraction:
        return fraction
    return float(Decimal(repr(float(fraction))).quantize(Decimal(1).scaleb(-SCORE_DECIMALS), ROUND_HALF_UP))


def fmt_pct(fraction: float) -> str:
    """'15.98' for 0.15975: the way every table, log line and report prints a score."""
    return f"{percent(fraction):.2f}"
