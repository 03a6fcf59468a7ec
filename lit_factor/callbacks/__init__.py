"""Lightning callbacks of lit-factor."""

from .latency import LatencyCallback
from .prediction import GLUEPredictionWriter
from .progress import LineProgress
from .resume import ExactResume
from .stability import StabilityMonitor
from .staging import StagingCallback
from .summary import RunSummary

__all__ = ["ExactResume", "GLUEPredictionWriter", "LatencyCallback", "LineProgress", "RunSummary", "StabilityMonitor",
           "StagingCallback"]
