"""Validation split, checkpoints, merge and W&B through the running service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from tests.data import easy_records, jsonl
from tests.service import Service, flush, submit


def test_validation_split_reports_eval_loss_and_keeps_last_checkpoints(service: Service, tiny_model_dir: Path) -> None:
    r = submit(service, tiny_model_dir, epochs=4, batch_size=2, validation_split=0.25, keep_checkpoints=2,
               learning_rate=3e-3)  # fmt: skip
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = service.wait_for(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    eval_losses = job["metrics"]["eval_losses"]
    assert [epoch for epoch, _ in eval_losses] == [1, 2, 3, 4]
    assert eval_losses[-1][1] < eval_losses[0][1]
    events = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    epochs = [e["data"] for e in events if e["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and all("eval_loss" in e for e in epochs)
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert metrics and {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(metrics[0])
    ckpt_root = service.base_path / "checkpoints" / job_id
    kept = sorted(p.name for p in ckpt_root.glob("step-*"))
    assert kept == ["step-000009", "step-000012"]  # 6 training records, batch 2: 3 steps per epoch
    meta = json.loads((ckpt_root / "step-000012" / "checkpoint.json").read_text())
    assert meta["epoch"] == 4 and meta["step"] == 12 and (ckpt_root / "step-000012" / "adapter_config.json").exists()


def test_merge_job_writes_a_model_that_matches_base_plus_adapter(service: Service, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = submit(service, tiny_model_dir, epochs=3, learning_rate=1e-2)  # seed defaults: tied embeddings trained
    job = service.wait_for(r.json()["job_id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    m = service.post(f"/jobs/{job['id']}/merge", json={"output_path": "merged"})
    assert m.status_code == 202, m.text
    merged_job = service.wait_for(m.json()["job_id"], {"succeeded", "failed"})
    assert merged_job["status"] == "succeeded" and merged_job["kind"] == "merge", merged_job
    merged_dir = Path(merged_job["model_path"])
    assert merged_dir == (service.base_path / "merged").resolve()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), job["model_path"])
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    assert service.post("/jobs/job-nope/merge").status_code == 404
    assert service.post(f"/jobs/{m.json()['job_id']}/merge").status_code == 409
    bad = service.post(f"/jobs/{job['id']}/merge", json={"output_path": "../../escape"})
    assert bad.status_code == 422

    # The seed's POST /merge: same adapter, merged on a worker, answered when done.
    adapter = str(Path(job["model_path"]).relative_to(service.base_path.resolve()))
    body = {"model_name": str(tiny_model_dir), "lora_path": adapter, "model_output": "seed/merged"}
    seed = service.post("/merge", json=body)
    assert seed.status_code == 200, seed.text
    result = seed.json()
    assert (result["status"], result["message"]) == ("success", "Model merged successfully")
    assert Path(result["output_path"]) == (service.base_path / "seed" / "merged").resolve()
    with torch.no_grad():
        seed_merged = AutoModelForCausalLM.from_pretrained(result["output_path"])
        torch.testing.assert_close(seed_merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    (service.base_path / "mine").mkdir()
    (service.base_path / "mine" / "notes.txt").write_text("mine")
    taken = service.post("/merge", json={**body, "model_output": "mine"})
    assert taken.status_code == 409 and taken.json()["errors"][0]["loc"] == ["body", "model_output"]
    assert (service.base_path / "mine" / "notes.txt").read_text() == "mine"
    missing = service.post("/merge", json={**body, "lora_path": "nowhere"})
    assert missing.status_code == 422 and "no adapter (adapter_config.json) at 'nowhere'" in missing.json()["detail"]
    assert service.post("/merge", json={**body, "push_to_hub": True}).status_code == 422
    jobs = service.get("/jobs").json()["data"]
    refused = service.post("/merge", json={**body, "model_name": "/etc"})  # the base-model rule, as for training
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["body", "model_name"]
    assert "absolute path outside base_path and every models directory" in refused.json()["detail"]
    assert service.get("/jobs").json()["data"] == jobs


@pytest.fixture
def wandb_dir(tmp_path: Path, redis_url: str) -> Path:
    folder = tmp_path / "wandb"
    folder.mkdir()
    flush(redis_url)
    return folder


def _service(tmp_path: Path, redis_url: str, wandb_dir: Path, **env: str) -> Service:
    env |= {"WANDB_DIR": str(wandb_dir), "WANDB_INIT_TIMEOUT": "10", "WANDB_SILENT": "true"}
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=env)
    svc.start()
    return svc


def _messages(svc: Service, job_id: str) -> str:
    job = svc.wait_for(job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded", job
    return " ".join(e["message"] for e in svc.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"])


def test_an_integrations_wandb_run_is_the_jobs_run(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path, wandb_dir: Path
) -> None:
    svc = _service(tmp_path, redis_url, wandb_dir, WANDB_MODE="offline")
    try:
        with OpenAI(base_url=svc.url + "/v1", api_key="k", max_retries=0) as client:
            file_id = client.files.create(file=("d.jsonl", jsonl(easy_records(4))), purpose="fine-tune").id
            wandb = {"project": "lora-tests", "name": "run-from-integration", "tags": ["ci"]}
            job = client.fine_tuning.jobs.create(
                model=str(tiny_model_dir),
                training_file=file_id,
                hyperparameters={"n_epochs": 2},
                integrations=[{"type": "wandb", "wandb": wandb}],
            )
        assert "logging to Weights & Biases run run-from-integration" in _messages(svc, job.id)
        (run,) = (wandb_dir / "wandb").glob("offline-run-*")
        assert any(p.suffix == ".wandb" for p in run.iterdir())
    finally:
        svc.stop()


def test_wandb_that_cannot_start_never_breaks_a_job(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path, wandb_dir: Path
) -> None:
    # No network here: W&B cannot start with a key it cannot check.
    svc = _service(tmp_path, redis_url, wandb_dir, WANDB_MODE="online", WANDB_API_KEY="not-a-real-key-" + "x" * 30)
    try:
        r = submit(svc, tiny_model_dir, epochs=2)
        assert r.status_code == 202, r.text
        assert "Weights & Biases logging is off" in _messages(svc, r.json()["job_id"])
    finally:
        svc.stop()


def test_second_uploaded_file_is_the_validation_set(service: Service, tiny_model_dir: Path) -> None:
    config = json.dumps({"model_name": str(tiny_model_dir), "epochs": 2})
    bad = service.post("/train", files={"config": (None, config), "file": ("t.jsonl", jsonl(easy_records(4))),
                                        "validation_file": ("v.jsonl", b'{"messages": []}\n')})  # fmt: skip
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["validation_file", "line 1"]
    assert not list((service.base_path / "datasets").glob("*.jsonl"))
    r = service.post("/train", files={"config": (None, config), "file": ("t.jsonl", jsonl(easy_records(4))),
                                      "validation_file": ("v.jsonl", jsonl(easy_records(8)[4:]))})  # fmt: skip
    assert r.status_code == 202, r.text
    job = service.wait_for(r.json()["job_id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert [epoch for epoch, _ in job["metrics"]["eval_losses"]] == [1, 2]
    assert job["metrics"]["num_examples"] == 4  # the validation records were not trained on
