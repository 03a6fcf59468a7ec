"""Lightning callbacks of lit-factor."""

from .latency import LatencyCallback
from .prediction import GLUEPredictionWriter
from .stability import StabilityMonitor
from .staging import StagingCallback

__all__ = ["GLUEPredictionWriter", "LatencyCallback", "StabilityMonitor", "StagingCallback"]
