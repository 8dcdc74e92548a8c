"""The seed's flow over real HTTP, a real Celery worker and a real Redis-compatible server.

(How `POST /train` refuses bad configs and datasets is tests/api/test_train.py's, in process.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from tests.data import easy_records, write_jsonl
from tests.service import Service, wait_until

CURL = shutil.which("curl")


def _curl_train(service: Service, config: dict[str, object], data: Path) -> dict[str, object]:
    """The seed README's curl command, with the config part sent as application/json."""
    assert CURL, "curl is needed to send the seed's request verbatim"
    out = subprocess.run(
        [CURL, "-s", "-X", "POST", f"{service.url}/train", "-H", "Content-Type: multipart/form-data",
         "-F", f"config={json.dumps(config)};type=application/json",
         "-F", f"file=@{data.name};type=application/json"],
        cwd=data.parent, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _wait_status(service: Service, wanted: set[str], timeout: float = 180) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = service.get("/status").json()
        return body if body["status"] in wanted else None

    return wait_until(reached, timeout=timeout, what=lambda: f"/status to reach {wanted}\n{service.logs('worker')}")


def test_seed_curl_trains_a_working_adapter(service: Service, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert service.get("/status").json()["status"] == "idle"
    data = write_jsonl(tmp_path / "training_data.json", easy_records(8))
    config = {"epochs": 40, "batch_size": 4, "learning_rate": 3e-3, "model_name": str(tiny_model_dir),
              "model_save_path": "my_lora_model"}  # fmt: skip
    accepted = _curl_train(service, config, data)
    assert set(accepted) >= {"job_id", "status", "message", "status_url"}
    job_id = accepted["job_id"]

    final = _wait_status(service, {"completed", "error"})
    assert final["status"] == "completed", final
    assert set(final) >= {"status", "message", "current_step", "total_steps", "current_epoch", "total_epochs",
                          "model_path"}  # fmt: skip
    assert final["current_step"] == final["total_steps"] == 80
    assert final["current_epoch"] == final["total_epochs"] == 40
    model_path = Path(str(final["model_path"]))
    assert model_path == (service.base_path / "my_lora_model").resolve()

    job = service.get(f"/jobs/{job_id}").json()
    losses = [loss for _, loss in job["metrics"]["losses"]]
    assert len(losses) == 80
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses

    summary = json.loads((model_path / "training_summary.json").read_text())
    assert summary["steps"] == 80
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What color is grass?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(base, model_path)
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
        out = tuned.generate(ids, max_new_tokens=12, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
    assert answer.startswith("It is green."), answer

    # Nothing half-written, no upload left in the incoming folder.
    assert not list((service.base_path / "datasets" / ".incoming").iterdir())
    assert not [p for p in service.base_path.iterdir() if p.name.startswith(".my_lora_model")]


def test_seed_curl_verbatim_on_a_host_without_the_default_model_is_refused_at_once(
    service: Service, tmp_path: Path
) -> None:
    """The README's command, unchanged, offline with an empty hub cache: the default hub model could never
    load, so the submission is a 422 saying why, at once, and no job is left behind."""
    data = write_jsonl(tmp_path / "training_data.json", easy_records(2))
    started = time.monotonic()
    refused = _curl_train(service, {"epochs": 3, "batch_size": 4}, data)
    assert time.monotonic() - started < 5
    assert "'Qwen/Qwen2.5-0.5B' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in str(
        refused["detail"]
    ), refused
    assert refused["errors"][0]["loc"] == ["config", "model_name"]  # type: ignore[index]
    assert service.get("/status").json()["status"] == "idle"
    assert service.get("/jobs").json()["data"] == []


def test_twenty_simultaneous_submissions_admit_exactly_one(
    service: Service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    service.stop_worker()  # the admitted job stays queued, so its slot stays taken throughout
    service.slot_elsewhere()  # the slot admission counts: a worker elsewhere that has not taken the job yet
    data = write_jsonl(tmp_path / "d.jsonl", easy_records(4)).read_bytes()
    config = json.dumps({"epochs": 1, "model_name": str(tiny_model_dir)})
    codes: list[int] = []
    barrier = threading.Barrier(20)

    def submit() -> None:
        barrier.wait()
        r = httpx.post(service.url + "/train", files={"config": (None, config), "file": ("d.jsonl", data)}, timeout=60)
        codes.append(r.status_code)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [202] + [409] * 19, codes
    # Refused uploads leave nothing behind: one dataset stored, no stray upload.
    stored = list((service.base_path / "datasets").glob("*.jsonl"))
    assert len(stored) == 1
    assert not list((service.base_path / "datasets" / ".incoming").iterdir())
    # The admitted job stays queued (no worker), holding the slot: a later submission is told which job has it.
    (job,) = service.get("/jobs").json()["data"]
    assert job["status"] == "queued"
    busy = service.post("/train", files={"config": (None, config), "file": ("d.jsonl", data)})
    assert busy.status_code == 409, busy.text
    assert busy.json()["running_jobs"] == [job["id"]] and "in progress" in busy.json()["detail"]


def test_unknown_module_to_save_fails_the_job_with_its_name(
    service: Service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", easy_records(2)).read_bytes()
    config = {"model_name": str(tiny_model_dir), "lora_modules_to_save": ["lm_head", "not_a_module"]}
    r = service.post("/train", files={"config": (None, json.dumps(config)), "file": ("d.jsonl", data)})
    assert r.status_code == 202
    job = service.wait_for(r.json()["job_id"], {"failed", "succeeded"})
    assert job["status"] == "failed" and "not_a_module" in job["error"]
    assert service.get("/status").json()["status"] == "error"
