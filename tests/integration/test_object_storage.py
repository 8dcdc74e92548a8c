"""Hosts that share no disk, only Redis and an object store (moto's S3 server, a real process over HTTP).

The API, the generation worker and each training worker have base paths of their own. A job trains on
whichever worker is free, staging its dataset from the store and sending its adapter there; the adapter
downloads through the API and chat completions answer with it; a second worker started mid-test adds its slot;
a worker killed mid-job has its job resumed on the other from the state it had sent to the store.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.fixtures.s3_server import S3Server
from tests.service import ROOT, Service, flush, submit, submit_long, wait_running, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def readme_host_command() -> str:
    """The README's command for a GPU host joining the service."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```bash\n(docker run [^`]*?LORA_STORAGE_URL[^`]*?)```", readme)
    assert match, "the README's deployment section shows no `docker run` of a worker with LORA_STORAGE_URL"
    return match.group(1)


def readme_host_settings() -> set[str]:
    """The service's settings (LORA_*) the README's host-joining command passes."""
    return set(re.findall(r"-e (LORA_[A-Z_]+)=", readme_host_command()))


@pytest.fixture
def hosts(tmp_path: Path, redis_url: str, s3_server: S3Server, s3_bucket: str) -> Iterator[Service]:
    """The API (and its generation worker) on one folder, a training worker on another: only the bucket is shared."""
    flush(redis_url)
    store = {"LORA_STORAGE_URL": f"s3://{s3_bucket}/lora", **s3_server.env, "LORA_STATE_EVERY_STEPS": "5",
             "LORA_STORAGE_PRESIGN_S": "600"}  # fmt: skip
    svc = Service(base_path=tmp_path / "api-host", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=store)
    svc.base_path.mkdir(parents=True)
    svc.log_dir.mkdir()
    svc.start_generator(LORA_BASE_PATH=str(tmp_path / "chat-host"))
    svc.start_api()
    svc.start_worker(LORA_BASE_PATH=str(tmp_path / "host-a"))
    try:
        yield svc
    finally:
        svc.stop()


def _objects(server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        item["Key"][len(prefix) :]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed
    }


def _host_of(svc: Service, job: dict[str, Any]) -> int:
    """Which of the service's workers ran `job` (its index in `svc.workers`)."""
    pids = [f"{socket.gethostname()}:{w.pid}" for w in svc.workers]
    return pids.index(job["worker"])


def test_the_readme_joins_a_host_with_a_redis_url_and_a_bucket_only() -> None:
    assert readme_host_settings() == {"LORA_REDIS_URL", "LORA_STORAGE_URL"}, readme_host_command()
    assert "-v " not in readme_host_command()  # no shared volume mounted


def test_jobs_train_on_hosts_that_share_only_the_store(
    hosts: Service, tiny_model_dir: Path, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    svc = hosts
    # A job trains on the only worker; its adapter is in the store, not on the API's disk.
    first = submit(svc, tiny_model_dir, epochs=3)  # a checkpoint per epoch, the newest 2 kept
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    done = svc.wait_for(job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    output = Path(done["model_path"])
    assert output == svc.base_path.resolve() / job_id and not output.exists()  # the API's name; not on its disk
    # The worker's host kept nothing of the job once the store had it (its dataset was staged, then tidied).
    wait_until(lambda: not (tmp_path / "host-a" / job_id).exists(), timeout=20, what="host-a to tidy the job's files")
    assert not (tmp_path / "host-a" / "datasets" / f"{job_id}.jsonl").exists()
    assert (tmp_path / "host-a" / "datasets").is_dir()  # it was there: staged from the store
    stored = _objects(s3_server, s3_bucket, f"lora/{job_id}/")
    assert {"adapter_model.safetensors", "adapter_config.json", ".lora-complete.json"} <= set(stored), sorted(stored)
    assert f"{job_id}.jsonl" in _objects(s3_server, s3_bucket, "lora/datasets/")  # the upload, sent by the API

    # Its adapter downloads through the API, streamed from the store: the same bytes.
    archive = svc.get(f"/jobs/{job_id}/artifacts/archive")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert members["adapter_model.safetensors"] == stored["adapter_model.safetensors"]
    listed = svc.get(f"/jobs/{job_id}/artifacts").json()
    assert {f["path"] for f in listed["files"]} == set(members) and listed["total_bytes"] == sum(
        map(len, members.values())
    )
    # Each file also has a signed URL to the store (LORA_STORAGE_PRESIGN_S), for clients that fetch it from there.
    weights = next(f for f in listed["files"] if f["path"] == "adapter_model.safetensors")
    assert (
        weights["url"].startswith(s3_server.endpoint) and httpx.get(weights["url"]).content == members[weights["path"]]
    )

    # Its checkpoints and its result file are read from the store too.
    client = OpenAI(base_url=svc.url + "/v1", api_key="unused")
    checkpoints = svc.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["epoch"] for c in checkpoints] == [2, 3], checkpoints  # the pruned one went from the store too
    step = checkpoints[-1]["step"]
    ckpt = svc.get(f"/jobs/{job_id}/artifacts/archive", params={"checkpoint": step})
    with tarfile.open(fileobj=io.BytesIO(ckpt.content), mode="r:gz") as tar:
        assert "adapter_model.safetensors" in tar.getnames() and "checkpoint.json" in tar.getnames()
    (result_id,) = client.fine_tuning.jobs.retrieve(job_id).result_files
    redirect = svc.get(f"/v1/files/{result_id}/content")  # a 307 to the store, signed
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_server.endpoint), redirect
    csv = client.files.content(result_id).content.decode()
    assert csv.startswith("step,") and len(csv.splitlines()) == 1 + done["metrics"]["steps"], csv

    # A merge runs on a worker that stages the adapter from the store and sends the merged model back.
    merging = svc.post(f"/jobs/{job_id}/merge")
    assert merging.status_code == 202, merging.text
    merged = svc.wait_for(merging.json()["job_id"], {"succeeded", "failed"})
    assert merged["status"] == "succeeded", merged
    merged_keys = _objects(s3_server, s3_bucket, f"lora/{Path(merged['model_path']).name}/")
    assert {"config.json", "model.safetensors", ".lora-complete.json"} <= set(merged_keys), sorted(merged_keys)

    # Chat completions answer with it: the generation worker, on a disk of its own, stages it from the store.
    model = next(m.id for m in client.models.list().data if m.id.startswith("ft:"))
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert (
        reply.choices[0].message.content is not None and reply.usage is not None and reply.usage.completion_tokens > 0
    )
    assert (tmp_path / "chat-host" / job_id / "adapter_model.safetensors").is_file()

    # A base model synced into the store by other means (no manifest of ours) trains by its name under the prefix:
    # the API finds its config there, the worker stages it and keeps it in its bounded cache.
    s3 = s3_server.client()
    for path in sorted(p for p in tiny_model_dir.rglob("*") if p.is_file()):
        s3.upload_file(str(path), s3_bucket, f"lora/models/tiny-in-store/{path.relative_to(tiny_model_dir).as_posix()}")
    from_store = submit(svc, tiny_model_dir, model_name="models/tiny-in-store", epochs=1)
    assert from_store.status_code == 202, from_store.text
    trained = svc.wait_for(from_store.json()["job_id"], {"succeeded", "failed"})
    assert trained["status"] == "succeeded", trained
    assert (tmp_path / "host-a" / "models" / "tiny-in-store" / ".lora-staged").is_file()
    assert not (svc.base_path / "models").exists()  # the API only looked it up in the store

    # A second host joins with what the README passes (the Redis URL and the bucket; AWS_* name the store):
    # its slot counts at once, and two jobs train side by side, one on each host.
    joining = {name: svc.env()[name] for name in readme_host_settings()}
    assert svc.health()["slots"] == 1
    svc.start_worker(**joining, LORA_BASE_PATH=str(tmp_path / "host-b"))
    assert svc.health()["slots"] == 2
    long_a, long_b = submit_long(svc, tiny_model_dir, epochs=60), submit_long(svc, tiny_model_dir, epochs=60)
    running = [wait_running(svc, long_a, min_step=6), wait_running(svc, long_b, min_step=1)]
    assert sorted(_host_of(svc, job) for job in running) == [0, 1]

    # The host running the first loses power mid-job: its job continues on the other host, from the state
    # it sent to the store (staged there from the bucket: the hosts share no disk).
    state_prefix = f"lora/.state/{long_a}/"
    wait_until(lambda: any(k.endswith("/.lora-complete.json") for k in _objects(s3_server, s3_bucket, state_prefix)),
               timeout=60, what="a saved state of the first long job in the store")  # fmt: skip
    lost = svc.workers[_host_of(svc, running[0])]
    os.killpg(lost.pid, signal.SIGKILL)
    lost.wait()
    wait_until(lambda: svc.health()["slots"] == 1, timeout=30, what="the lost host's slot to lapse")
    assert svc.post(f"/jobs/{long_b}/cancel").status_code == 202  # the survivor takes the lost job next
    resumed = svc.wait_for(long_a, {"succeeded", "failed", "cancelled"}, timeout=300)
    assert resumed["status"] == "succeeded" and resumed["attempts"] == 2, resumed
    events = [e["message"] for e in svc.get(f"/jobs/{long_a}/events", params={"limit": 1000}).json()["data"]]
    assert any("resuming from step" in m for m in events), events
    assert not _objects(s3_server, s3_bucket, state_prefix)  # its states go once it has ended
    assert _objects(s3_server, s3_bucket, f"lora/{long_a}/").keys() >= {
        "adapter_model.safetensors",
        ".lora-complete.json",
    }


def test_a_store_that_goes_down_fails_the_job_clearly_and_refuses_uploads(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = S3Server(tmp_path / "moto.log").start()
    bucket = server.create_bucket("lora-down")
    flush(redis_url)
    env = {"LORA_STORAGE_URL": f"s3://{bucket}/lora", **server.env, "LORA_STATE_EVERY_STEPS": "5"}
    svc = Service(base_path=tmp_path / "api-host", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=env)
    svc.base_path.mkdir(parents=True)
    svc.log_dir.mkdir()
    svc.start_api()
    svc.start_worker(LORA_BASE_PATH=str(tmp_path / "host-a"))
    try:
        job_id = submit_long(svc, tiny_model_dir, epochs=30)
        wait_running(svc, job_id, min_step=2)
        server.stop()
        # The run goes on while only its state saves fail; its adapter cannot reach the store: failed, saying why.
        failed = svc.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
        assert failed["status"] == "failed" and f"object store s3://{bucket}/lora" in failed["error"], failed
        assert svc.health()["busy"] == 0  # its slot is free

        refused = submit(svc, tiny_model_dir)
        assert refused.status_code == 503 and f"object store s3://{bucket}/lora" in refused.json()["detail"], (
            refused.text
        )
        assert [j["id"] for j in svc.get("/jobs").json()["data"]] == [job_id]  # nothing of the refused job
        assert sorted(p.name for p in (svc.base_path / "datasets").glob("*.jsonl")) == [f"{job_id}.jsonl"]
        assert svc.health()["busy"] == 0
    finally:
        svc.stop()
        server.stop()
