"""Timing harness: interleaved runs and robust statistics."""

from .timing import Stats, interleaved_timings

__all__ = ["Stats", "interleaved_timings"]
