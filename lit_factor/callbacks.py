"""Every lit-factor callback under one short name, for configs: ``class_path: lit_factor.callbacks.StagingCallback``.

A facade on the top floor (like the CLI): nothing inside lit_factor imports it. The callbacks live with their
concern -- training in :mod:`lit_factor.train.callbacks`, latency measurement in :mod:`lit_factor.deploy.callback`.
"""

from lit_factor.deploy.callback import LatencyCallback
from lit_factor.train.callbacks import (
    ExactResume,
    GLUEPredictionWriter,
    LineProgress,
    RunSummary,
    StabilityMonitor,
    StagingCallback,
)

__all__ = ["ExactResume", "GLUEPredictionWriter", "LatencyCallback", "LineProgress", "RunSummary", "StabilityMonitor",
           "StagingCallback"]
