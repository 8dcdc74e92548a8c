"""A job's files over HTTP: listing, checkpoints in the agreed layout, and the streamed tar.gz."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import httpx

from tests.data import easy_records, jsonl
from tests.service import Service


def _submit(service: Service, **config: object) -> str:
    files = {"config": (None, json.dumps(config)), "file": ("d.jsonl", jsonl(easy_records(4)))}
    r = service.post("/train", files=files)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def _checkpoint(root: Path, step: int, *, meta: bool = True) -> Path:
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"step": step}))
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * step)
    if meta:
        body = {"step": step, "epoch": step // 2, "loss": 1.5 / step, "created_at": time.time()}
        (folder / "checkpoint.json").write_text(json.dumps(body))
    return folder


def test_a_succeeded_job_lists_and_streams_its_adapter_and_checkpoints(
    service: Service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    job_id = _submit(service, model_name=str(tiny_model_dir), epochs=2, model_save_path="nested/my adapter")
    assert service.wait_for(job_id, {"succeeded", "failed"})["status"] == "succeeded"
    adapter = service.base_path / "nested" / "my adapter"
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the volume")
    (adapter / "leak.txt").symlink_to(secret)  # a link must be neither listed nor followed

    listing = service.get(f"/jobs/{job_id}/artifacts").json()
    on_disk = {p.name: p.stat().st_size for p in adapter.iterdir() if p.is_file() and not p.is_symlink()}
    assert {f["path"]: f["size"] for f in listing["files"]} == on_disk
    assert {"adapter_config.json", "adapter_model.safetensors", "training_summary.json"} <= set(on_disk)
    assert listing["total_bytes"] == sum(on_disk.values())
    assert listing["status"] == "succeeded" and listing["model_path"] == str(adapter.resolve())
    assert listing["archive_url"] == f"{service.url}/jobs/{job_id}/artifacts/archive"

    with httpx.stream("GET", listing["archive_url"], timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
        assert r.headers["content-disposition"] == 'attachment; filename="my_adapter.tar.gz"'
        assert "content-length" not in r.headers  # streamed, not built in memory first
        chunks = list(r.iter_raw())
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == sorted(on_disk)
        for m in members:
            assert m.isfile() and not m.name.startswith(("/", ".."))
            extracted = tar.extractfile(m)
            assert extracted is not None and extracted.read() == (adapter / m.name).read_bytes(), m.name

    # Checkpoints, as the worker lays them out; incomplete or foreign folders are not listed.
    root = service.base_path / "checkpoints" / job_id
    _checkpoint(root, 1000)
    _checkpoint(root, 1001, meta=False)  # still being written
    (root / "notes").mkdir()
    elsewhere = _checkpoint(tmp_path / "elsewhere", 1002)
    (root / "step-001002").symlink_to(elsewhere, target_is_directory=True)
    page = service.get(f"/jobs/{job_id}/checkpoints").json()
    mine = {c["step"]: c for c in page["data"] if c["step"] >= 1000}
    assert list(mine) == [1000]
    ckpt = mine[1000]
    assert ckpt["name"] == "step-001000" and ckpt["epoch"] == 500 and abs(ckpt["loss"] - 0.0015) < 1e-9
    assert {f["path"] for f in ckpt["files"]} == {"adapter_config.json", "adapter_model.safetensors", "checkpoint.json"}
    assert ckpt["total_bytes"] == sum(f["size"] for f in ckpt["files"])
    assert "path" not in ckpt  # no server paths beyond model_path
    assert 1000 in {c["step"] for c in service.get(f"/jobs/{job_id}/artifacts").json()["checkpoints"]}

    r = service.get(ckpt["archive_url"].removeprefix(service.url))
    assert r.status_code == 200
    assert r.headers["content-disposition"] == f'attachment; filename="{job_id}-step-001000.tar.gz"'
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint.json"]
    for step in (1001, 1002, 999):
        assert service.get(f"/jobs/{job_id}/artifacts/archive", params={"checkpoint": step}).status_code == 404


def test_jobs_without_an_adapter_have_no_files_and_unknown_jobs_are_404(service: Service, tiny_model_dir: Path) -> None:
    for path in ("artifacts", "checkpoints", "artifacts/archive"):
        r = service.get(f"/jobs/job-nope/{path}")
        assert r.status_code == 404 and "job-nope" in r.json()["detail"], path
    assert service.get("/jobs/..%2F..%2Fetc/artifacts").status_code == 404

    job_id = _submit(service, model_name=str(tiny_model_dir), lora_modules_to_save=["nope"])
    assert service.wait_for(job_id, {"succeeded", "failed"})["status"] == "failed"
    listing = service.get(f"/jobs/{job_id}/artifacts").json()
    assert listing["files"] == [] and listing["archive_url"] is None and listing["model_path"] is None
    r = service.get(f"/jobs/{job_id}/artifacts/archive")
    assert r.status_code == 409 and "failed" in r.json()["detail"]
    assert service.get(f"/jobs/{job_id}/checkpoints").json() == {"job_id": job_id, "data": []}
