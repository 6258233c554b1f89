"""tunecomp: compress a pretrained model while fine-tuning it (the TuneComp method).

Public API::

    from tunecomp import FusedPrunedLowRankLinear, ops, replace_linear_layers
"""

from . import ops
from .nn import FusedPrunedLowRankLinear
from .surgery import DEFAULT_TARGETS, SurgeryReport, prepare, replace_linear_layers
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGETS",
    "FusedPrunedLowRankLinear",
    "SurgeryReport",
    "TrainConfig",
    "ops",
    "prepare",
    "replace_linear_layers",
    "train",
    "__version__",
]
