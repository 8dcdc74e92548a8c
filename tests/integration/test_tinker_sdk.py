"""The Tinker SDK (`tinker`, the official client) against the real API, training worker and generation worker,
with the tiny model: a supervised loop learns, forward logprobs match transformers, each RL loss equals its
formula, save_state/load_state continue exactly, two clients stay independent, a killed worker fails futures."""

from __future__ import annotations

import io
import math
import os
import signal
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.s3_server import S3Server
from tests.service import Service, flush
from tests.tinker_clients import close_all, service_client

types = tinker.types

pytestmark = [
    pytest.mark.timeout(600),
    # The SDK leaves its event-loop thread's sockets to the garbage collector.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

PAIRS = [
    ("What colour is the sky?", "Blue, on a clear day."),
    ("Name a prime number.", "Seven is prime."),
    ("What do cows drink?", "Cows drink water."),
    ("Capital of France?", "Paris, of course."),
    ("How many legs has a spider?", "A spider has eight."),
    ("What is ice?", "Frozen water."),
    ("Say hello.", "Hello there!"),
    ("Which planet is red?", "Mars looks red."),
]


@pytest.fixture
def tinker_service(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    flush(redis_url)
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs",
                  env_extra={"LORA_TINKER_IDLE_TIMEOUT_S": "300"})  # fmt: skip
    svc.start()
    svc.start_worker()  # two worker processes: two training clients hosted at once
    os.environ["TINKER_TELEMETRY"] = "0"
    try:
        yield svc
    finally:
        close_all()
        svc.stop()


def _client(service: Service) -> tinker.ServiceClient:
    return service_client(service.url, "tml-test")


def _datum(tokens: list[int], prompt_len: int) -> types.Datum:
    weights = [0.0] * (prompt_len - 1) + [1.0] * (len(tokens) - prompt_len)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def _conversations(model_dir: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt tokens, answer tokens ending in the end-of-turn token) for each pair."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for question, answer in PAIRS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]  # fmt: skip
        reply = [*tok.encode(answer, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]
        out.append((list(prompt), reply))
    return out


def test_a_supervised_loop_learns_eight_conversations_and_samples_them_back(
    tinker_service: Service, tiny_model_dir: Path
) -> None:
    service_client = _client(tinker_service)
    training = service_client.create_lora_training_client(base_model=tiny_model_dir.name, rank=16).result()
    convs = _conversations(tiny_model_dir)
    data = [_datum(p + a, len(p)) for p, a in convs]
    losses = []
    for _ in range(60):
        fb = training.forward_backward(data, "cross_entropy")
        step = training.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    assert losses[-1] < losses[0] / 20, losses
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=24, temperature=0.0, stop=[convs[0][1][-1]])
    futures = [sampler.sample(types.ModelInput.from_ints(p), 1, params) for p, _ in convs]
    for (_, answer), future in zip(convs, futures, strict=True):
        seq = future.result().sequences[0]
        assert seq.tokens == answer
        assert seq.stop_reason == "stop"
        assert len(seq.logprobs) == len(seq.tokens)

    # the trained state is an adapter folder like a job's: chat completions serve it by its tinker:// name,
    # it downloads as a tar.gz, and the seed's /merge folds it into its base
    saved = training.save_state("learned").result().path
    chat = tinker_service.post("/v1/chat/completions", json={
        "model": saved, "temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": PAIRS[3][0]}],
    })  # fmt: skip
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == PAIRS[3][1]
    run_id, checkpoint_id = saved.removeprefix("tinker://").split("/", 1)
    archive = tinker_service.get(f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/archive")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
    folder = f"tinker/{run_id.replace(':', '-')}/{checkpoint_id}"
    merged = httpx.post(tinker_service.url + "/merge", timeout=180, json={
        "model_name": tiny_model_dir.name, "lora_path": folder, "model_output": "learned-merged",
    })  # fmt: skip
    assert merged.status_code == 200 and merged.json()["status"] == "success", merged.text
    assert (tinker_service.base_path / "learned-merged" / "config.json").is_file()


def test_forward_logprobs_before_any_step_equal_transformers(tinker_service: Service, tiny_model_dir: Path) -> None:
    training = _client(tinker_service).create_lora_training_client(base_model=tiny_model_dir.name, rank=8).result()
    convs = _conversations(tiny_model_dir)[:3]
    data = [_datum(p + a, len(p)) for p, a in convs]
    result = training.forward(data, "cross_entropy").result()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    for (p, a), out in zip(convs, result.loss_fn_outputs, strict=True):
        tokens = p + a
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
        want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
        assert out["logprobs"].to_torch().tolist() == pytest.approx(want.tolist(), abs=1e-4)


def _rl_formula(name: str, lp: list[float], s: list[float], adv: list[float], cfg: dict[str, float]) -> float:
    total = 0.0
    for x, q, a in zip(lp, s, adv, strict=True):
        r = math.exp(x - q)
        lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
        total -= {
            "importance_sampling": r * a,
            "ppo": min(r * a, min(max(r, lo), hi) * a),
            "cispo": min(max(r, lo), hi) * x * a,
            "dro": x * a - 0.5 * cfg.get("beta", 0.0) * (x - q) ** 2,
        }[name]
    return total


def test_each_rl_loss_reports_its_formula_and_save_load_state_continues_exactly(
    tinker_service: Service, tiny_model_dir: Path
) -> None:
    training = _client(tinker_service).create_lora_training_client(base_model=tiny_model_dir.name, rank=8).result()
    convs = _conversations(tiny_model_dir)[:2]
    data = []
    for i, (p, a) in enumerate(convs):
        tokens = p + a
        n = len(tokens) - 1
        adv = [0.0] * (len(p) - 1) + [(-1.0) ** (i + j) * 0.5 for j in range(n - len(p) + 1)]
        sampled = [-3.0 + 0.05 * j for j in range(n)]
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": sampled, "advantages": adv}))  # fmt: skip
    configs: list[tuple[str, dict[str, float] | None]] = [
        ("importance_sampling", None), ("ppo", None), ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
        ("cispo", None), ("dro", {"beta": 0.2}),
    ]  # fmt: skip
    for name, cfg in configs:
        out = training.forward_backward(data, name, loss_fn_config=cfg).result()
        expected = sum(
            _rl_formula(name, o["logprobs"].to_torch().tolist(), d.loss_fn_inputs["logprobs"].to_torch().tolist(),
                        d.loss_fn_inputs["advantages"].to_torch().tolist(), cfg or {})
            for d, o in zip(data, out.loss_fn_outputs, strict=True)
        )  # fmt: skip
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5), name
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    sft = [_datum(p + a, len(p)) for p, a in convs]
    saved = training.save_state("after-rl").result().path
    assert saved.startswith("tinker://") and saved.endswith("/weights/after-rl")

    def two_steps(client: tinker.TrainingClient) -> list[float]:
        out = []
        for _ in range(2):
            out.append(client.forward_backward(sft, "cross_entropy").result().metrics["loss:sum"])
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        return out

    continued = two_steps(training)
    restored = _client(tinker_service).create_training_client_from_state_with_optimizer(saved).result()
    assert two_steps(restored) == pytest.approx(continued, rel=1e-5)
    # the SDK still offers load_state* on a client (deprecated in favour of the calls above): still served
    with pytest.warns(FutureWarning, match="deprecated"):
        loaded = training.load_state_with_optimizer(saved)
    loaded.result()
    assert two_steps(training) == pytest.approx(continued, rel=1e-5)
    with pytest.warns(FutureWarning, match="deprecated"):
        weights_only = training.load_state(saved)
    weights_only.result()
    assert training.forward(sft, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(continued[0], rel=1e-5)


def test_two_training_clients_on_one_base_train_independently(tinker_service: Service, tiny_model_dir: Path) -> None:
    service_client = _client(tinker_service)
    a = service_client.create_lora_training_client(base_model=tiny_model_dir.name, rank=8, seed=1).result()
    b = service_client.create_lora_training_client(base_model=tiny_model_dir.name, rank=8, seed=1).result()
    convs = _conversations(tiny_model_dir)
    data_a = [_datum(p + ans, len(p)) for p, ans in convs[:4]]
    probe = [_datum(p + ans, len(p)) for p, ans in convs[4:]]
    before = b.forward(probe, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(5):
        a.forward_backward(data_a, "cross_entropy")
        a.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    assert a.forward(probe, "cross_entropy").result().metrics["loss:sum"] != pytest.approx(before, rel=1e-6)
    assert b.forward(probe, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before, rel=1e-6)


def test_a_killed_worker_fails_pending_futures_and_the_last_save_state_still_loads(
    tinker_service: Service, tiny_model_dir: Path
) -> None:
    service_client = _client(tinker_service)
    training = service_client.create_lora_training_client(base_model=tiny_model_dir.name, rank=8).result()
    data = [_datum(p + a, len(p)) for p, a in _conversations(tiny_model_dir)[:2]]
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    saved = training.save_state("before-crash").result().path
    expected = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    for worker in tinker_service.workers:  # whichever hosts the model: SIGKILL, like a host losing power
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    pending = training.forward(data, "cross_entropy")
    with pytest.raises(tinker.RequestFailedError, match="lost") as failed:
        pending.result(timeout=90)
    assert "before-crash" in str(failed.value)
    tinker_service.start_worker()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = service_client.create_training_client_from_state(saved).result()
    assert restored.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_a_training_client_on_hosts_that_share_only_the_object_store(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    """The API, the generation worker and two training workers on folders of their own, the bucket between them:
    a sampler's weights are sampled on another host, and the state one host saved (before it lost power) loads
    on the other."""
    flush(redis_url)
    env = {"LORA_STORAGE_URL": f"s3://{s3_bucket}/lora", **s3_server.env, "LORA_TINKER_IDLE_TIMEOUT_S": "300"}
    svc = Service(base_path=tmp_path / "api-host", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=env)
    svc.base_path.mkdir(parents=True)
    svc.log_dir.mkdir()
    svc.start_generator(LORA_BASE_PATH=str(tmp_path / "chat-host"))
    svc.start_api()
    svc.start_worker(LORA_BASE_PATH=str(tmp_path / "host-a"))
    os.environ["TINKER_TELEMETRY"] = "0"
    try:
        service_client = _client(svc)
        training = service_client.create_lora_training_client(base_model=tiny_model_dir.name, rank=8).result()
        convs = _conversations(tiny_model_dir)
        data = [_datum(p + a, len(p)) for p, a in convs[:2]]
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler = training.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=4, temperature=0.0)
        assert len(sampler.sample(types.ModelInput.from_ints(convs[0][0]), 1, params).result().sequences[0].tokens) > 0
        assert list((tmp_path / "chat-host" / "tinker").rglob("adapter_model.safetensors"))  # staged there

        saved = training.save_state("on-host-a").result().path
        expected = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
        run_id, checkpoint_id = saved.removeprefix("tinker://").split("/", 1)
        archive = svc.get(f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/archive")  # from the store
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
        assert not (svc.base_path / "tinker").exists()  # nothing of it on the API's disk

        host_a = svc.workers[0]
        os.killpg(host_a.pid, signal.SIGKILL)
        host_a.wait()
        with pytest.raises(tinker.RequestFailedError, match="lost"):  # once its host is known lost
            training.forward(data, "cross_entropy").result(timeout=90)
        svc.start_worker(LORA_BASE_PATH=str(tmp_path / "host-b"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            restored = service_client.create_training_client_from_state(saved).result()
        assert restored.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        assert list((tmp_path / "host-b" / "tinker").rglob("adapter_model.safetensors"))  # staged from the store
    finally:
        close_all()
        svc.stop()
