"""Lightning callbacks of lit-factor."""

from .latency import LatencyCallback

__all__ = ["LatencyCallback"]
