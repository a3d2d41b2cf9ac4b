"""Training components: the loop and its checkpoints."""

from asymlora.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from asymlora.train.loop import TrainingError, TrainResult, batch_indices, train

__all__ = [
    "TrainResult",
    "TrainingError",
    "batch_indices",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
