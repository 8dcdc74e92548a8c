"""The seed's `POST /merge`: a worker merges the adapter and the call answers with the merged folder."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.data import easy_records
from tests.service import Service
from worker.training import TrainConfig, train_model


def test_seed_merge_body_merges_on_a_worker(service: Service, tiny_model_dir: Path) -> None:
    adapter = service.base_path / "my_lora"
    train_model(TrainConfig(model_name=str(tiny_model_dir), epochs=1), easy_records(4), output_dir=adapter)
    body = {"model_name": str(tiny_model_dir), "lora_path": "my_lora", "model_output": "merged/my_model"}
    r = service.post("/merge", json=body)
    assert r.status_code == 200, r.text
    result = r.json()
    merged = service.base_path / "merged" / "my_model"
    assert (result["status"], result["message"]) == ("success", "Model merged successfully")
    assert Path(result["output_path"]) == merged.resolve()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(merged)(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4
        )
    assert service.job(result["job_id"])["kind"] == "merge"

    (service.base_path / "mine").mkdir()
    (service.base_path / "mine" / "notes.txt").write_text("mine")
    taken = service.post("/merge", json={**body, "model_output": "mine"})
    assert taken.status_code == 409 and taken.json()["errors"][0]["loc"] == ["body", "model_output"]
    missing = service.post("/merge", json={**body, "lora_path": "nowhere"})
    assert missing.status_code == 422 and "no adapter (adapter_config.json) at 'nowhere'" in missing.json()["detail"]
    extra = service.post("/merge", json={**body, "push_to_hub": True})
    assert extra.status_code == 422
    assert (service.base_path / "mine" / "notes.txt").read_text() == "mine"
