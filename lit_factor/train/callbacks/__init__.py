"""Lightning callbacks of training: staging, stability, exact resume, the run summary, progress lines, GLUE files.

They talk to :class:`~lit_factor.train.module.FactorizedClassifier` through its typed interface only (see that
module's docstring). The latency callback measures deployment speed and lives with the deploy package
(:mod:`lit_factor.deploy.callback`); :mod:`lit_factor.callbacks` re-exports all of them for configs.
"""

from lit_factor.train.callbacks.prediction import GLUEPredictionWriter
from lit_factor.train.callbacks.progress import LineProgress
from lit_factor.train.callbacks.resume import ExactResume
from lit_factor.train.callbacks.stability import StabilityMonitor
from lit_factor.train.callbacks.staging import StagingCallback
from lit_factor.train.callbacks.summary import RunSummary

__all__ = ["ExactResume", "GLUEPredictionWriter", "LineProgress", "RunSummary", "StabilityMonitor", "StagingCallback"]
