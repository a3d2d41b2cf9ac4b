"""Training components: the loop and its checkpoints."""

from asymlora.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from asymlora.train.loop import (
    StepLoop,
    TrainingError,
    TrainResult,
    batch_indices,
    local_loss_value,
    step_batches,
    train,
)

__all__ = [
    "StepLoop",
    "TrainResult",
    "TrainingError",
    "batch_indices",
    "latest_checkpoint",
    "load_checkpoint",
    "local_loss_value",
    "save_checkpoint",
    "step_batches",
    "train",
]
