"""The event contract: what the worker emits today parses into the typed payloads every reader uses."""

from __future__ import annotations

import pytest
import redis
from pydantic import ValidationError

from shared.events import (
    CancelRequested,
    InfoNotice,
    JobEvent,
    StatusChanged,
    WarningNotice,
    event_type,
    payload,
)
from shared.metrics import CheckpointSaved, EpochEnd, StepMetrics, TrainingSummary
from shared.store import JobStore

# The payloads as the worker's training loop writes them (worker/training/run.py: _on_step, _on_epoch_end, notices).
WORKER_PAYLOADS = [
    ("metrics", {"step": 3, "epoch": 1, "loss": 2.25, "learning_rate": 3e-4, "grad_norm": 1.5,
                 "tokens_per_second": 812.0, "step_seconds": 0.11}, StepMetrics),
    ("epoch", {"epoch": 1, "step": 4, "loss": 2.1}, EpochEnd),
    ("epoch", {"epoch": 2, "step": 8, "loss": None, "eval_loss": 1.9}, EpochEnd),
    ("warning", {"requested": "flash_attention_2", "using": "sdpa"}, WarningNotice),
    ("warning", {}, WarningNotice),
    ("info", {"trainable_params": 10, "total_params": 100, "examples": 8, "device": "cpu",
              "validation_examples": 0}, InfoNotice),
    ("status", {"status": "running"}, StatusChanged),
    ("cancel_requested", {}, CancelRequested),
    ("checkpoint", {"step": 8, "epoch": 2, "train_loss": 2.0, "train_mean_token_accuracy": 0.5, "valid_loss": None,
                    "full_valid_loss": None, "created_at": 1.5}, CheckpointSaved),
]  # fmt: skip


@pytest.mark.parametrize(("etype", "data", "model"), WORKER_PAYLOADS)
def test_todays_payloads_parse_into_their_models_and_back(etype: str, data: dict[str, object], model: type) -> None:
    parsed = payload(etype, data)
    assert type(parsed) is model and event_type(parsed) == etype
    event = JobEvent.model_validate({"id": "1-0", "type": etype, "created_at": 1.0, "message": "m", "data": data})
    assert event.data == parsed
    assert {k: v for k, v in event.data.model_dump().items() if k in data} == data


def test_a_checkpoint_payload_written_before_the_openai_names_reads_as_what_it_was() -> None:
    old = payload("checkpoint", {"step": 8, "epoch": 2, "loss": 2.0, "eval_loss": 1.9, "created_at": 1.5})
    assert isinstance(old, CheckpointSaved)
    assert (old.train_loss, old.full_valid_loss, old.valid_loss, old.train_mean_token_accuracy) == (
        2.0,
        1.9,
        None,
        None,
    )
    assert (old.loss, old.eval_loss) == (2.0, 1.9)  # the native API's names


def test_a_payload_missing_a_field_or_of_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValidationError, match="loss"):
        payload("metrics", {"step": 1, "epoch": 1})
    with pytest.raises(ValidationError, match="status"):
        payload("status", {"status": "sleeping"})
    with pytest.raises(ValueError, match="unknown event type 'progress'"):
        payload("progress", {})


def test_events_round_trip_through_the_store(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    store.add_event("job-a", StepMetrics(step=1, epoch=1, loss=2.0), "step 1")
    store.add_event("job-a", WarningNotice(skipped=2), "2 examples skipped")
    metrics, warning = store.events("job-a")
    assert (metrics.type, metrics.message, metrics.data) == (
        "metrics",
        "step 1",
        StepMetrics(step=1, epoch=1, loss=2.0),
    )
    assert warning.type == "warning" and warning.data.model_dump() == {"skipped": 2}
    assert store.events_newest_first("job-a") == [warning, metrics]


def test_the_training_summary_parses_what_a_run_reports() -> None:
    # worker/training/run.py's TrainResult.summary(): tuples become lists in JSON, checkpoints carry their folder.
    reported = {"output_dir": "/v/a", "stopped": False, "steps": 4, "total_steps": 4, "final_loss": 1.0,
                "num_examples": 8, "skipped_examples": 0, "total_tokens": 96, "elapsed_s": 1.5,
                "tokens_per_second": 64.0, "losses": [(1, 2.0), (2, 1.5)], "eval_losses": [(1, 1.8)],
                "checkpoints": [{"step": 4, "epoch": 1, "loss": 1.2, "eval_loss": 1.8, "created_at": 2.0,
                                 "path": "/v/checkpoints/job-a/step-000004"}]}  # fmt: skip
    summary = TrainingSummary.model_validate(reported)
    assert summary.total_tokens == 96 and summary.losses == [(1, 2.0), (2, 1.5)]
    assert summary.checkpoints[0].path.endswith("step-000004")
    assert TrainingSummary.model_validate_json(summary.model_dump_json()) == summary
