"""Validation split, checkpoints, merge and W&B through the running service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.data import easy_records, jsonl
from tests.service import Service, submit


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
    kept = sorted(p.name for p in ckpt_root.iterdir())
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


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_wandb_logs_when_configured_and_never_breaks_a_job(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path, mode: str
) -> None:
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": mode, "WANDB_DIR": str(wandb_dir), "WANDB_INIT_TIMEOUT": "10", "WANDB_SILENT": "true"}
    if mode == "online":
        env["WANDB_API_KEY"] = "not-a-real-key-" + "x" * 30  # no network here: W&B cannot start
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=env)
    svc.start()
    try:
        r = svc.post("/train", files={"config": (None, json.dumps({"model_name": str(tiny_model_dir), "epochs": 2})),
                                      "file": ("d.jsonl", jsonl(easy_records(4)))})  # fmt: skip
        job = svc.wait_for(r.json()["job_id"], {"succeeded", "failed"}, timeout=240)
        assert job["status"] == "succeeded", job
        events = svc.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        messages = " ".join(e["message"] for e in events)
        if mode == "offline":
            assert "Weights & Biases run" in messages
            runs = list((wandb_dir / "wandb").glob("offline-run-*"))
            assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
        else:
            assert "Weights & Biases logging is off" in messages
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
