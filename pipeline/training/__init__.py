"""Training the heads: the one episodic loop, fed cached views (train) or decoded clips through the
backbone (finetune), run folders and their resume rules, and one loader for every checkpoint kind.
"""

from pipeline.training.checkpoints import (
    Checkpoint,
    CheckpointError,
    load_backbone_weights,
    load_checkpoint,
)
from pipeline.training.clips import FinetuneError
from pipeline.training.config import TrainError
from pipeline.training.runs import RunError, RunLog, read_metrics
from pipeline.training.state import TrainProgress
from pipeline.training.train import make_config

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
