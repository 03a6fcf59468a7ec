"""Lightning callbacks of lit-factor."""

from .latency import LatencyCallback
from .stability import StabilityMonitor
from .staging import StagingCallback

__all__ = ["LatencyCallback", "StabilityMonitor", "StagingCallback"]
