"""A job's files on a host without the shared disk: named under this host's base path, staged from a real S3
server (moto's server mode), tidied and kept within the cache bound."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from shared.config import TrainConfig
from shared.jobs import JobRecord, JobStatus
from shared.outputs import OUTPUT_MARKER, DestinationInUse
from shared.settings import Settings
from shared.volume import Volume
from worker.jobs import staging


def _record(api_base: Path, job_id: str = "job-0123456789abcdef0123") -> JobRecord:
    return JobRecord(
        id=job_id, status=JobStatus.queued, created_at=0, config=TrainConfig(model_name="/models/tiny"),
        dataset_path=str(api_base / "datasets" / f"{job_id}.jsonl"), output_dir=str(api_base / "my-adapter"),
        adapter_dir=str(api_base / "earlier-adapter"), volume_base=str(api_base), model_dir="/models/tiny",
    )  # fmt: skip


def test_a_records_paths_are_found_under_this_hosts_base_path(tmp_path: Path) -> None:
    api_base, here = tmp_path / "api", tmp_path / "host"
    files = staging.JobFiles.of(_record(api_base), Settings(base_path=here))
    assert files.dataset == here.resolve() / "datasets" / "job-0123456789abcdef0123.jsonl"
    assert files.output == here.resolve() / "my-adapter" and files.adapter == here.resolve() / "earlier-adapter"
    assert files.model == "/models/tiny"  # outside the API's base path: the same on every host
    # A record from before the field (a shared disk): its paths as they are.
    legacy = _record(api_base).model_copy(update={"volume_base": None})
    assert staging.JobFiles.of(legacy, Settings(base_path=here)).output == api_base / "my-adapter"
    assert Volume(here).localize("/elsewhere/x", str(api_base)) == Path("/elsewhere/x")


def test_a_file_this_host_wrote_is_named_as_the_api_names_it(tmp_path: Path) -> None:
    api_base, here = tmp_path / "api", tmp_path / "host"
    settings = Settings(base_path=here)
    local = here / "checkpoints" / "job-0123456789abcdef0123" / "step_metrics.csv"
    named = staging.api_name(settings, _record(api_base), local)
    assert named == str(api_base / "checkpoints" / "job-0123456789abcdef0123" / "step_metrics.csv")


def test_a_job_is_staged_from_the_store_and_its_newest_state_with_it(tmp_path: Path, s3_bucket: str) -> None:
    api_base, here = tmp_path / "api", tmp_path / "host"
    record = _record(api_base)
    writer = Settings(base_path=api_base, storage_url=f"s3://{s3_bucket}/p")
    assert writer.store is not None
    dataset = api_base / "datasets" / f"{record.id}.jsonl"
    dataset.parent.mkdir(parents=True)
    dataset.write_text('{"messages": []}\n')
    writer.store.push_file(dataset)
    (api_base / "earlier-adapter").mkdir()
    (api_base / "earlier-adapter" / "adapter_config.json").write_text("{}")
    writer.store.push_tree(api_base / "earlier-adapter")
    for step in ("step-000005", "step-000010"):
        state = writer.volume.job_state(record.id) / step
        state.mkdir(parents=True)
        (state / "state.json").write_text(step)
        writer.store.push_tree(state)

    host = Settings(base_path=here, storage_url=f"s3://{s3_bucket}/p")
    files = staging.JobFiles.of(record, host)
    staging.stage_training(files, host, record.id)
    assert files.dataset.read_text() == '{"messages": []}\n'
    assert (here / "earlier-adapter" / "adapter_config.json").read_text() == "{}"
    assert (here / "earlier-adapter" / staging.STAGED_MARK).exists()  # a cache entry now
    staged_states = sorted(p.name for p in host.volume.job_state(record.id).iterdir())
    assert staged_states == ["step-000010"]  # the newest only

    missing = staging.JobFiles.of(_record(api_base, "job-ffffffffffffffffffff"), host)
    try:
        staging.stage_training(missing, host, "job-ffffffffffffffffffff")
    except FileNotFoundError as exc:
        assert "datasets/job-ffffffffffffffffffff.jsonl" in str(exc) and s3_bucket in str(exc)
    else:
        raise AssertionError("a dataset the store lacks must be a clear error")


def test_staged_copies_are_evicted_least_recently_used_first(tmp_path: Path) -> None:
    base = tmp_path / "host"
    now = time.time()
    for i, name in enumerate(("old", "mid", "new")):
        folder = base / "models" / name
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"x" * 1000)
        staging.mark_staged(folder)
        os.utime(folder / staging.STAGED_MARK, (now - 300 + 100 * i, now - 300 + 100 * i))
    (base / "mine").mkdir()
    (base / "mine" / "weights.bin").write_bytes(b"y" * 5000)  # never staged: never evicted
    deleted = staging.evict_staged(base, max_bytes=2000)
    assert [p.name for p in deleted] == ["old"]
    assert sorted(p.name for p in (base / "models").iterdir()) == ["mid", "new"] and (base / "mine").is_dir()
    assert staging.evict_staged(base, max_bytes=2000) == []


def test_an_adapter_is_never_sent_over_objects_a_user_put_under_its_name(tmp_path: Path, s3_bucket: str) -> None:
    host = Settings(base_path=tmp_path / "host", storage_url=f"s3://{s3_bucket}/p")
    assert host.store is not None
    output = tmp_path / "host" / "my-adapter"
    output.mkdir(parents=True)
    (output / "adapter_model.safetensors").write_bytes(b"new")
    (output / OUTPUT_MARKER).write_text(json.dumps({"written_by": "lora-server", "kind": "adapter"}))
    theirs = tmp_path / "host" / "my-adapter-theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    host.store.client.upload_file(str(theirs / "notes.txt"), s3_bucket, "p/my-adapter/notes.txt")
    try:
        staging.push_output(host, output)
    except DestinationInUse as exc:
        assert "p/my-adapter" in str(exc) and "did not write" in str(exc)
    else:
        raise AssertionError("objects a user put there must not be replaced")
    assert host.store.list_tree(output) == {"notes.txt": 4}  # untouched, and no manifest of ours
    host.store.delete_tree(output)
    staging.push_output(host, output)  # once theirs are gone, the adapter goes up
    staging.push_output(host, output)  # and again over our own (a retry)
    assert host.store.manifest(output) == {
        OUTPUT_MARKER: (output / OUTPUT_MARKER).stat().st_size,
        "adapter_model.safetensors": 3,
    }
