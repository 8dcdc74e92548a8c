"""The Tinker-compatible API (api.tinker) driven by the real `tinker` SDK against a real API process, with no
training or generation worker: sessions, capabilities, models waiting for their host, every bad input refused
at once with its field named, unsupported calls refused without retries, futures that outlive an API restart,
and a lost host reported on the futures that waited for it.

Where a test needs a training client, the test settles its create future itself, as the hosting worker does
once the model is loaded (shared.tinker_store.complete with a CreatedResult): the API is under test here."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import httpx
import pytest
import redis
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from shared import keys
from shared import tinker_store as ts
from shared.jobs import JobStatus
from shared.store import JobStore
from shared.tinker_ops import CreatedResult
from tests.service import Service, flush, wait_until
from tests.tinker_clients import close_all, track

# The SDK's HTTP pools leave sockets for the garbage collector even after its clients are closed (its own
# leak, not the server's): their ResourceWarnings are not this module's failures.
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
KEY = "tinker-test-secret"
T = TypeVar("T")


@pytest.fixture
def api(tmp_path: Path, redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """The API alone (no worker, but one training slot announced by a worker elsewhere that never takes its jobs),
    with an API key and small Tinker limits."""
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    flush(redis_url)
    env = {
        "LORA_API_KEY": KEY,
        "LORA_TINKER_POLL_S": "1",
        "LORA_TINKER_MAX_CALL_TOKENS": "64",
        "LORA_TINKER_MAX_REQUEST_BYTES": "65536",
        "TINKER_TELEMETRY": "0",
    }
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=env)
    svc.base_path.mkdir(parents=True, exist_ok=True)
    svc.log_dir.mkdir(parents=True, exist_ok=True)
    svc.start_api()
    svc.slot_elsewhere()
    try:
        yield svc
    finally:
        close_all()
        svc.stop()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _sdk(api: Service) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=api.url, api_key=f"tml-{KEY}")
    track(client)
    return client


def _rest(api: Service) -> tinker.RestClient:
    client = tinker.RestClient(base_url=api.url, api_key=f"tml-{KEY}")
    track(client)
    return client


def _post(api: Service, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(api.url + "/api/v1" + path, headers={"X-API-Key": f"tml-{KEY}", **kw.pop("headers", {})},
                      timeout=30, **kw)  # fmt: skip


def _raises_fast(exc: type[Exception], action: Callable[[], object], *fields: str, limit_s: float = 5.0) -> str:
    """`action` fails with `exc` within `limit_s` (not retried), its message naming every one of `fields`."""
    started = time.monotonic()
    with pytest.raises(exc) as caught:
        action()
    took = time.monotonic() - started
    assert took < limit_s, f"took {took:.1f} s: retried?"
    message = str(caught.value)
    for field in fields:
        assert field in message, message
    return message


def _session(api: Service) -> str:
    created = _post(api, "/create_session", json={"tags": [], "sdk_version": "0.38.0", "type": "create_session"})
    assert created.status_code == 200, created.text
    return str(created.json()["session_id"])


def _create(api: Service, session_id: str, seq: int = 0, **extra: Any) -> httpx.Response:
    body = {"session_id": session_id, "model_seq_id": seq, "base_model": "tiny", "type": "create_model",
            "lora_config": {"rank": 4, "train_unembed": True, "train_mlp": True, "train_attn": True}, **extra}  # fmt: skip
    return _post(api, "/create_model", json=body)


class Trained:
    """A training client made through the SDK, its model's creation settled as its host would settle it."""

    def __init__(self, api: Service, rclient: redis.Redis) -> None:
        self.service = _sdk(api)
        made: dict[str, Any] = {}

        def create() -> None:
            try:
                made["client"] = self.service.create_lora_training_client(base_model="tiny", rank=4).result()
            except BaseException as exc:
                made["error"] = exc

        thread = threading.Thread(target=create, daemon=True)
        thread.start()
        model_id = self.service.holder.get_session_id() + ":train:0"
        model = wait_until(lambda: ts.get_model(rclient, model_id), timeout=30, what=f"model {model_id}")
        assert model.create_request_id is not None
        ts.complete(rclient, model.create_request_id, CreatedResult(model_id=model_id))
        thread.join(30)
        assert "error" not in made, made
        self.client: tinker.TrainingClient = made["client"]
        self.model_id = model_id


def _datum(tokens: list[int], **inputs: list[float] | list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)  # type: ignore[arg-type]


def _raw_fwdbwd(api: Service, model_id: str, data: list[types.Datum], loss_fn: str, seq_id: int = 1,
                **config: float) -> httpx.Response:  # fmt: skip
    """A forward_backward the SDK's own encoder builds, for what its client-side checks would not let through."""
    # Duck-typed: the SDK's own request types would refuse these losses before its encoder sees them.
    fb_input = SimpleNamespace(data=data, loss_fn=loss_fn, loss_fn_config=config or None)
    request = SimpleNamespace(model_id=model_id, seq_id=seq_id, forward_backward_input=fb_input)
    body = forward_backward_request_to_proto(request).SerializeToString()  # type: ignore[arg-type]
    return _post(api, "/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})


def _vocab(tiny_model_dir: Path) -> int:
    return int(json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"])


# --------------------------------------------------------------------------- service calls and auth


def test_sessions_capabilities_and_the_key_rule(api: Service, rclient: redis.Redis) -> None:
    service = _sdk(api)
    rest = _rest(api)
    assert "tiny" in [m.model_name for m in rest.get_server_capabilities().result().supported_models]
    session_id = service.holder.get_session_id()
    assert rclient.zscore(keys.TINKER_SESSIONS, session_id) is not None
    info = rest.get_session(session_id).result()
    assert (info.training_run_ids, info.sampler_ids) == ([], [])
    assert _post(api, "/session_heartbeat", json={"session_id": session_id}).status_code == 200
    assert _post(api, "/session_heartbeat", json={"session_id": "nope"}).status_code == 404
    service.close("success").result()
    assert _post(api, "/session_heartbeat", json={"session_id": session_id}).status_code == 410
    # The key: as sent by the SDK (tml-<key>), bare, or as the native API's bearer token; nothing else.
    assert httpx.get(api.url + "/api/v1/training_runs", headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(api.url + "/api/v1/training_runs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    refused = httpx.get(api.url + "/api/v1/training_runs", headers={"X-API-Key": "tml-wrong"})
    assert refused.status_code == 401 and "TINKER_API_KEY=tml-<LORA_API_KEY>" in refused.text
    assert httpx.get(api.url + "/jobs", headers={"X-API-Key": f"tml-{KEY}"}).status_code == 401  # /api/v1 only
    _raises_fast(tinker.AuthenticationError,
                 lambda: tinker.RestClient(base_url=api.url, api_key="tml-wrong").list_training_runs().result(),
                 "TINKER_API_KEY")  # fmt: skip


# --------------------------------------------------------------------------- models


def test_a_created_model_waits_for_its_hosting_job(api: Service, rclient: redis.Redis) -> None:
    session_id = _session(api)
    created = _create(api, session_id)
    assert created.status_code == 200, created.text
    future = created.json()
    model_id = f"{session_id}:train:0"
    assert future["model_id"] == model_id
    assert _create(api, session_id).json() == future  # the SDK's retry of the same create: the same future
    model = ts.get_model(rclient, model_id)
    assert model is not None and model.job_id is not None and model.vocab_size is not None
    job = JobStore(rclient).get(model.job_id)
    assert job is not None and job.kind == "tinker" and job.status.value == "queued"
    assert job.tinker_model == model_id
    assert job.output_dir == str(api.base_path / "tinker" / model_id.replace(":", "-"))
    assert job.config.lora_rank == 4 and job.max_attempts == 1
    assert api.get(f"/jobs/{model.job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()["status"] == "queued"
    polled = _post(api, "/retrieve_future", json={"request_id": future["request_id"]})
    assert polled.status_code == 200 and polled.json()["type"] == "try_again", polled.text
    info = _post(api, "/get_info", json={"model_id": model_id}).json()
    assert info["model_data"]["model_name"] == "tiny" and info["lora_rank"] == 4
    runs = _rest(api).list_training_runs().result()
    assert model_id in [r.training_run_id for r in runs.training_runs]


def test_create_model_refusals_name_the_field(api: Service) -> None:
    service = _sdk(api)
    _raises_fast(tinker.BadRequestError, lambda: service.create_lora_training_client(base_model="no/such-model").result(),
                 "base_model")  # fmt: skip
    session_id = _session(api)
    too_big = _create(api, session_id, lora_config={"rank": 100_000})
    assert too_big.status_code == 400 and "lora_config.rank" in too_big.json()["detail"], too_big.text
    nothing = _create(api, session_id, lora_config={"rank": 4, "train_attn": False, "train_mlp": False,
                                                     "train_unembed": False})  # fmt: skip
    assert nothing.status_code == 400 and "lora_config" in nothing.json()["detail"]
    assert _create(api, "no-session").status_code == 404


def test_a_future_outlives_an_api_restart(api: Service) -> None:
    session_id = _session(api)
    request_id = _create(api, session_id).json()["request_id"]
    api.kill_api()
    api.start_api()
    polled = _post(api, "/retrieve_future", json={"request_id": request_id})
    assert polled.status_code == 200 and polled.json()["type"] == "try_again", polled.text
    assert _post(api, "/retrieve_future", json={"request_id": "never-issued"}).status_code == 404


# --------------------------------------------------------------------------- training calls


def test_bad_training_calls_are_refused_at_once_naming_the_field(
    api: Service, rclient: redis.Redis, tiny_model_dir: Path
) -> None:
    trained = Trained(api, rclient)
    client, model_id = trained.client, trained.model_id
    vocab = _vocab(tiny_model_dir)
    ok = [1, 2, 3]

    def fwdbwd(datum: types.Datum, loss: str = "cross_entropy", **config: float) -> object:
        return client.forward_backward([datum], loss, config or None).result()  # type: ignore[arg-type]

    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(_datum([1, vocab, 3], target_tokens=ok)), "model_input[1]")
    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(_datum(ok, target_tokens=[1, 2, -1])), "target_tokens")
    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(_datum(ok, target_tokens=[1, 2])), "target_tokens", "length")
    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(_datum(ok, target_tokens=ok, weights=[1.0])), "weights")
    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(_datum(ok, target_tokens=ok), "importance_sampling"),
                 "logprobs", "missing")  # fmt: skip
    rl = _datum(ok, target_tokens=ok, logprobs=[-1.0] * 3, advantages=[1.0] * 3)
    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(rl, "ppo", clip_lo=0.5), "clip_lo")
    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(rl, "dro"), "beta")
    _raises_fast(tinker.BadRequestError, lambda: fwdbwd(_datum(list(range(1, 70)), target_tokens=list(range(1, 70)))),
                 "LORA_TINKER_MAX_CALL_TOKENS")  # fmt: skip
    _raises_fast(tinker.BadRequestError, lambda: client.save_state("a/b").result(), "path")
    missing = f"tinker://{model_id}/weights/none"
    _raises_fast(tinker.BadRequestError,
                 lambda: trained.service.create_training_client_from_state(missing).result(), "path")  # fmt: skip
    load = {"model_id": model_id, "seq_id": 1, "path": missing, "optimizer": False, "type": "load_weights"}
    refused = _post(api, "/load_weights", json=load)
    assert refused.status_code == 400 and "path" in refused.json()["detail"], refused.text
    # What the SDK's own checks would stop: sent through its encoder.
    for loss, field in (("gspo", "not supported"), ("custom", "not supported"), ("no_such_loss", "cross_entropy")):
        refused = _raw_fwdbwd(api, model_id, [_datum(ok, target_tokens=ok)], loss)
        assert refused.status_code == 400 and field in refused.json()["detail"], refused.text
    empty = _raw_fwdbwd(api, model_id, [], "cross_entropy")
    assert empty.status_code == 400 and "data" in empty.json()["detail"]
    image = types.Datum(model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"x", format="png", expected_tokens=3)]),
                        loss_fn_inputs={"target_tokens": types.TensorData(data=ok, dtype="int64")})  # fmt: skip
    refused = _raw_fwdbwd(api, model_id, [image], "cross_entropy")
    assert refused.status_code == 400 and "image" in refused.json()["detail"], refused.text
    huge = _raw_fwdbwd(api, model_id, [_datum(list(range(20_000)), target_tokens=list(range(20_000)))], "cross_entropy")
    assert huge.status_code == 400 and "LORA_TINKER_MAX_REQUEST_BYTES" in huge.json()["detail"]
    dimuon = _post(api, "/optim_step", json={"model_id": model_id, "seq_id": 1, "type": "optim_step",
                                             "optimizer_params": {"type": "dimuon", "learning_rate": 0.1}})  # fmt: skip
    assert dimuon.status_code == 400 and "dimuon" in dimuon.json()["detail"]
    assert _post(api, "/optim_step", json={"model_id": "nope", "seq_id": 1, "adam_params": {}}).status_code == 404
    # Nothing refused was queued; a good call is, once, whatever the client's retries.
    assert ts.pending_calls(rclient, model_id) == []
    step = {"model_id": model_id, "seq_id": 1, "type": "optim_step", "adam_params": {"learning_rate": 1e-4}}
    first, again = _post(api, "/optim_step", json=step).json(), _post(api, "/optim_step", json=step).json()
    assert first == again and first["model_id"] == model_id
    assert [c.seq_id for c in ts.pending_calls(rclient, model_id)] == [1]


def test_a_finished_session_closes_its_models(api: Service, rclient: redis.Redis) -> None:
    trained = Trained(api, rclient)
    trained.service.close("success").result()
    refused = _raw_fwdbwd(api, trained.model_id, [_datum([1], target_tokens=[2])], "cross_entropy")
    assert refused.status_code == 400 and "closed" in refused.json()["detail"], refused.text
    model = ts.get_model(rclient, trained.model_id)
    assert model is not None and model.closed


def test_a_lost_host_fails_the_waiting_futures_and_refuses_new_calls(api: Service, rclient: redis.Redis) -> None:
    trained = Trained(api, rclient)
    model_id = trained.model_id
    future = trained.client.optim_step(types.AdamParams(learning_rate=1e-4))
    model = ts.get_model(rclient, model_id)
    assert model is not None and model.job_id is not None
    wait_until(lambda: ts.pending_calls(rclient, model_id), timeout=10, what="the optim_step to be queued")
    assert JobStore(rclient).abort(model.job_id, "the worker vanished")
    message = _raises_fast(tinker.RequestFailedError, lambda: future.result(), "was lost", "no state of it was saved")
    assert "the worker vanished" in message
    _raises_fast(tinker.BadRequestError, lambda: trained.client.optim_step(types.AdamParams()).result(), "was lost")


# --------------------------------------------------------------------------- sampling, checkpoints, the rest


def test_bad_samples_are_refused_and_no_worker_is_a_503(api: Service, tiny_model_dir: Path) -> None:
    service = _sdk(api)
    sampler = service.create_sampling_client(base_model="tiny").result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=4)
    _raises_fast(tinker.BadRequestError, lambda: sampler.sample(prompt, 17, params).result(), "num_samples")
    _raises_fast(tinker.BadRequestError,
                 lambda: sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, top_p=0.0)).result(), "top_p")  # fmt: skip
    _raises_fast(tinker.BadRequestError,
                 lambda: sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10**6)).result(), "max_tokens")  # fmt: skip
    far = types.ModelInput.from_ints([_vocab(tiny_model_dir)])
    _raises_fast(tinker.BadRequestError, lambda: sampler.sample(far, 1, params).result(), "prompt")
    session_id = service.holder.get_session_id()
    body = {"sampling_session_id": f"{session_id}:sample:0", "seq_id": 0, "num_samples": 1, "type": "sample",
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2}}  # fmt: skip
    unavailable = _post(api, "/asample", json=body)
    assert unavailable.status_code == 503 and "generation worker" in unavailable.json()["detail"]


def test_checkpoint_calls_and_unsupported_calls(api: Service) -> None:
    rest = _rest(api)
    _raises_fast(tinker.NotFoundError, lambda: rest.list_checkpoints("no-such-run").result(), "no-such-run")
    assert rest.list_user_checkpoints().result().checkpoints == []
    _raises_fast(tinker.BadRequestError,
                 lambda: rest.publish_checkpoint_from_tinker_path("tinker://r:train:0/weights/x").result(),
                 "not supported")  # fmt: skip
    for path in ("/cancel_future", "/copy_weights", "/auth/token", "/save_weights_external"):
        refused = _post(api, path, json={})
        assert refused.status_code == 400 and refused.headers["x-should-retry"] == "false", (path, refused.text)
        assert refused.json() == {"detail": f"{path[1:]} is not supported by this server", "type": "unsupported"} or (
            "not supported" in refused.json()["detail"]
        )


# --------------------------------------------------------------------------- hosting


def _host_goes_idle(store: JobStore, model_id: str, job_id: str) -> None:
    """What a host does when its client went quiet: it saves the model's state, takes it off (its job_id cleared)
    and, with no client left, ends its job, succeeded."""
    assert store.claim(job_id, token="host", lease_s=60, worker="test-host") == "ok"
    model = ts.get_model(store.client, model_id)
    assert model is not None
    ts.save_model(
        store.client, model.model_copy(update={"job_id": None, "load_from": "/saved", "load_optimizer": True})
    )
    assert store.finish(job_id, token="host", status=JobStatus.succeeded, message="idle") is JobStatus.succeeded


def test_an_idle_host_is_started_again_once_and_a_full_slot_is_reported(api: Service, rclient: redis.Redis) -> None:
    store = JobStore(rclient)
    session_id = _session(api)
    assert _create(api, session_id).status_code == 200
    model_id = f"{session_id}:train:0"
    first = ts.get_model(rclient, model_id)
    assert first is not None and first.job_id is not None
    _host_goes_idle(store, model_id, first.job_id)
    # Another model takes the only slot: the idle model's next host has to wait in line for it.
    other = _create(api, session_id, seq=1).json()
    polled = _post(api, "/retrieve_future", json={"request_id": other["request_id"]}).json()
    assert polled["type"] == "try_again" and polled["queue_state"] == "active", polled
    steps = [{"model_id": model_id, "seq_id": seq, "type": "optim_step", "adam_params": {"learning_rate": 1e-4}}
             for seq in (1, 2)]  # fmt: skip
    with ThreadPoolExecutor(2) as pool:  # two calls at once start one host, not two
        answers = list(pool.map(lambda step: _post(api, "/optim_step", json=step), steps))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    again = ts.get_model(rclient, model_id)
    assert again is not None and again.job_id not in (None, first.job_id)
    tinker_jobs = [j for j in (store.get(i) for i, _ in store.list_ids(limit=10)) if j and j.kind == "tinker"]
    assert len(tinker_jobs) == 3, [(j.id, j.status) for j in tinker_jobs]  # the first, the other model's, the new one
    assert store.queue_position(again.job_id) == 1
    polled = _post(api, "/retrieve_future", json={"request_id": answers[0].json()["request_id"]}).json()
    assert polled["type"] == "try_again" and polled["queue_state"] == "paused_capacity", polled
    assert "training slot" in polled["queue_state_reason"]


def test_a_training_client_from_a_saved_state(api: Service, rclient: redis.Redis, tmp_path: Path) -> None:
    trained = Trained(api, rclient)
    saved = f"tinker://{trained.model_id}/weights/step-1"
    folder = api.base_path / "tinker" / trained.model_id.replace(":", "-") / "weights" / "step-1"
    # What the host records once it saved the state.
    ts.add_checkpoint(rclient, trained.model_id, ts.CheckpointInfo(tinker_path=saved, checkpoint_type="training",
                      name="step-1", folder=str(folder), created_ms=ts.now_ms()))  # fmt: skip
    listed = _rest(api).list_checkpoints(trained.model_id).result().checkpoints
    assert [(c.checkpoint_id, c.checkpoint_type, c.tinker_path) for c in listed] == [
        ("weights/step-1", "training", saved)
    ]
    made: dict[str, Any] = {}

    def create() -> None:
        made["client"] = trained.service.create_training_client_from_state_with_optimizer(saved).result()

    thread = threading.Thread(target=create, daemon=True)
    thread.start()
    model_id = trained.service.holder.get_session_id() + ":train:1"
    model = wait_until(lambda: ts.get_model(rclient, model_id), timeout=30, what=f"model {model_id}")
    assert (model.load_from, model.load_optimizer, model.rank, model.base_model) == (str(folder), True, 4, "tiny")
    assert model.create_request_id is not None and model.job_id is not None
    ts.complete(rclient, model.create_request_id, CreatedResult(model_id=model_id))
    thread.join(30)
    assert made["client"].model_id == model_id
    # A name already saved is refused unless overwrite is asked for.
    again = _post(api, "/save_weights", json={"model_id": trained.model_id, "seq_id": 1, "path": "step-1"})
    assert again.status_code == 400 and "overwrite" in again.json()["detail"], again.text
    assert _post(api, "/save_weights", json={"model_id": trained.model_id, "seq_id": 1, "path": "step-1",
                                             "overwrite": True}).status_code == 200  # fmt: skip
    rest = _rest(api)
    assert rest.get_weights_info_by_tinker_path(saved).result().lora_rank == 4
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    rest.delete_checkpoint_from_tinker_path(saved).result()
    assert not folder.exists() and rest.list_checkpoints(trained.model_id).result().checkpoints == []
    _raises_fast(tinker.NotFoundError, lambda: rest.delete_checkpoint_from_tinker_path(saved).result(), "step-1")


def test_a_new_model_joins_a_running_host_on_its_base(api: Service, rclient: redis.Redis, tiny_model_dir: Path) -> None:
    store = JobStore(rclient)
    session_id = _session(api)
    assert _create(api, session_id).status_code == 200
    first = ts.get_model(rclient, f"{session_id}:train:0")
    assert first is not None and first.job_id is not None
    host_job = store.get(first.job_id)
    assert host_job is not None and host_job.model_dir is not None
    # The worker took the job and registered it: one client, room for more on this base.
    assert store.claim(host_job.id, token="host", lease_s=60, worker="test-host") == "ok"
    ts.save_host(rclient, ts.HostInfo(job_id=host_job.id, model_dir=host_job.model_dir, clients=[first.model_id],
                                      capacity=2))  # fmt: skip
    assert _create(api, session_id, seq=1).status_code == 200
    second = ts.get_model(rclient, f"{session_id}:train:1")
    assert second is not None and second.job_id == host_job.id  # no job of its own
    assert rclient.lrange(keys.tinker_host_attach_key(host_job.id), 0, -1) == [second.model_id]
    ts.save_host(rclient, ts.HostInfo(job_id=host_job.id, model_dir=host_job.model_dir,
                                      clients=[first.model_id, second.model_id], capacity=2))  # fmt: skip
    assert _create(api, session_id, seq=2).status_code == 200  # a full host: a job of its own
    third = ts.get_model(rclient, f"{session_id}:train:2")
    assert third is not None and third.job_id not in (None, host_job.id)
