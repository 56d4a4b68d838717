from .checkpoints import (
    Checkpoint,
    CheckpointError,
    load_backbone_weights,
    load_checkpoint,
)
from .clips import FinetuneError
from .config import TrainError
from .runs import RunError, RunLog, read_metrics
from .state import TrainProgress
from .train import make_config

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FinetuneError",
    "RunError",
    "RunLog",
    "TrainError",
    "TrainProgress",
    "load_backbone_weights",
    "load_checkpoint",
    "make_config",
    "read_metrics",
]
