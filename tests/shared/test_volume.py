"""The volume's layout: every path the service writes, and the names a user's output may not take."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.volume import Volume, checkpoint_name, checkpoint_staging_name, checkpoint_step, merged_name


def test_every_path_the_service_writes(tmp_path: Path) -> None:
    v = Volume(tmp_path)
    assert v.dataset("job-a") == tmp_path / "datasets" / "job-a.jsonl"
    assert v.job_datasets("job-a") == (tmp_path / "datasets/job-a.jsonl", tmp_path / "datasets/job-a.validation.jsonl")
    assert v.staging("file-1") == tmp_path / "datasets" / ".incoming" / "file-1.jsonl.part"
    assert v.new_upload().parent == v.incoming and v.new_upload() != v.new_upload()
    assert v.checkpoint("job-a", 120) == tmp_path / "checkpoints" / "job-a" / "step-000120"
    assert v.redis_data == tmp_path / ".redis"
    assert v.job_state("job-a") == tmp_path / ".state" / "job-a"
    assert v.default_output("job-a") == "job-a"
    assert merged_name("/v/my_adapter/") == "my_adapter-merged"
    assert not list(tmp_path.iterdir())  # naming a path creates nothing


def test_checkpoint_names_and_their_staging_folders() -> None:
    assert checkpoint_name(7) == "step-000007" and checkpoint_step("step-000007") == 7
    staging = checkpoint_staging_name(7)
    assert staging.startswith(".step-000007.") and staging.endswith(".tmp") and checkpoint_step(staging) is None
    assert checkpoint_step("notes") is None


def test_a_job_folder_is_only_ever_a_job_id(tmp_path: Path) -> None:
    for bad in ("..", "../etc", "job-1:events", ""):
        with pytest.raises(ValueError, match="is not a job id"):
            Volume(tmp_path).job_checkpoints(bad)
        with pytest.raises(ValueError, match="is not a job id"):
            Volume(tmp_path).job_state(bad)


@pytest.mark.parametrize(
    ("path", "reserved"),
    [("datasets", "datasets"), ("checkpoints/x", "checkpoints"), (".redis", ".redis"), ("a/.b/c", ".b"),
     ("adapters/mine", None)],
)  # fmt: skip
def test_the_services_own_names_are_reserved(tmp_path: Path, path: str, reserved: str | None) -> None:
    assert Volume(tmp_path).reserved_part((tmp_path / path).resolve()) == reserved
