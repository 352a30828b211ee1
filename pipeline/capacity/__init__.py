"""Capacity: how much each backend takes (a fixed cap or an adaptive limit)."""

from pipeline.capacity.limit import (
    AdaptiveLimit,
    ConcurrencyLimit,
    FixedLimit,
    LimitTuning,
    Saturation,
)

__all__ = ["AdaptiveLimit", "ConcurrencyLimit", "FixedLimit", "LimitTuning", "Saturation"]
