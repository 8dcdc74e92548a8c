"""The figures a training run reports: per logged step, per epoch, per checkpoint, and at the end.

The worker builds these; every reader (the jobs API, the OpenAI layer, the CLI, the dashboard)
parses them, so a field is named here once and nowhere guessed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.volume import CheckpointMeta


class StepMetrics(BaseModel):
    """One logged optimizer step (every step on CPU, every `log_every` steps on a GPU)."""

    model_config = ConfigDict(extra="ignore")

    step: int = Field(ge=0, description="optimizer steps done, counted over the whole run")
    epoch: int = Field(ge=0, description="the epoch the step belongs to, from 1")
    loss: float = Field(description="mean training loss over the step's tokens")
    accuracy: float | None = Field(
        default=None, description="fraction of the step's loss tokens predicted right (argmax); None where not computed"
    )
    valid_loss: float | None = Field(default=None, description="loss on one batch of the validation set")
    valid_accuracy: float | None = Field(default=None, description="token accuracy on that batch")
    learning_rate: float | None = Field(default=None, description="the scheduled rate for this step")
    grad_norm: float | None = Field(default=None, description="gradient norm before clipping")
    tokens_per_second: float | None = Field(default=None, description="real (unpadded) tokens per second")
    step_seconds: float | None = Field(default=None, description="wall time since the previous step")
    reward_margin: float | None = Field(
        default=None, description="DPO: mean of beta * (chosen - rejected) policy/reference log-ratio"
    )
    reward_accuracy: float | None = Field(default=None, description="DPO: fraction of pairs with a positive margin")


class EpochEnd(BaseModel):
    """An epoch finished (a checkpoint follows when the job keeps any)."""

    model_config = ConfigDict(extra="ignore")

    epoch: int = Field(ge=0, description="epochs done")
    step: int = Field(ge=0, description="optimizer steps done")
    loss: float | None = Field(default=None, description="the epoch's mean training loss")
    accuracy: float | None = Field(default=None, description="the epoch's mean training token accuracy")
    eval_loss: float | None = Field(default=None, description="loss on the validation split, when the job has one")
    eval_accuracy: float | None = Field(default=None, description="token accuracy on the validation split")


class CheckpointSaved(CheckpointMeta):
    """A checkpoint was written: the content of its `checkpoint.json`."""


class SavedCheckpoint(CheckpointMeta):
    """A checkpoint kept at the end of a run, with its folder on the volume."""

    path: str


class TrainingSummary(BaseModel):
    """What a training run reports when it ends (also written as the adapter's `training_summary.json`)."""

    model_config = ConfigDict(extra="ignore")

    output_dir: str | None = Field(default=None, description="the adapter folder; None when stopped before saving")
    stopped: bool = Field(default=False, description="cancelled or cut off before the last step")
    steps: int = Field(default=0, description="optimizer steps done")
    total_steps: int = Field(default=0, description="optimizer steps planned")
    final_loss: float | None = None
    num_examples: int = Field(default=0, description="examples trained on (validation records excluded)")
    skipped_examples: int = Field(default=0, description="examples with no assistant token left after truncation")
    total_tokens: int = Field(default=0, description="real (unpadded) tokens trained on")
    elapsed_s: float = 0.0
    tokens_per_second: float = 0.0
    losses: list[tuple[int, float]] = Field(default_factory=list, description="(step, loss) of each logged step")
    eval_losses: list[tuple[int, float]] = Field(default_factory=list, description="(epoch, validation loss)")
    checkpoints: list[SavedCheckpoint] = Field(default_factory=list, description="the checkpoints kept")
