"""The seed's one-liner: train in-process, no server or Redis."""

from pathlib import Path

import torch

from tests.data import easy_records


def test_train_model_in_process_with_progress_and_merge(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shared.jobs import Progress
    from worker.training import LocalControl, TrainConfig, merge_model, train_model

    seen: list[Progress] = []
    result = train_model(
        TrainConfig(model_name=str(tiny_model_dir), epochs=3, batch_size=4, learning_rate=1e-2),
        easy_records(8),
        output_dir=tmp_path / "adapter",
        control=LocalControl(on_progress=seen.append),
    )
    assert [p.current_step for p in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1].total_steps == 6 and seen[-1].current_epoch == 3 and seen[-1].loss is not None
    assert result.output_dir == tmp_path / "adapter" and not result.stopped
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "training_summary.json").exists()

    merged_dir = merge_model(tmp_path / "adapter", tmp_path / "merged")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_should_stop_ends_the_run_without_saving(tiny_model_dir: Path, tmp_path: Path) -> None:
    from worker.training import LocalControl, TrainConfig, train_model

    steps: list[int] = []
    result = train_model(
        TrainConfig(model_name=str(tiny_model_dir), epochs=50),
        easy_records(8),
        output_dir=tmp_path / "adapter",
        control=LocalControl(on_progress=lambda p: steps.append(p.current_step), stop=lambda: len(steps) >= 3),
    )
    assert result.stopped and result.output_dir is None and result.steps == 3
    assert not (tmp_path / "adapter").exists()


def test_stop_requested_before_training_ends_the_run_during_tokenization(tiny_model_dir: Path, tmp_path: Path) -> None:
    from worker.training import LocalControl, TrainConfig, train_model

    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 2  # after two polls: while the 2,000 records are being tokenized

    result = train_model(
        TrainConfig(model_name=str(tiny_model_dir)),
        easy_records(2000),
        output_dir=tmp_path / "adapter",
        control=LocalControl(stop=should_stop),
    )
    assert result.stopped and result.steps == 0 and result.output_dir is None
    assert not (tmp_path / "adapter").exists()
