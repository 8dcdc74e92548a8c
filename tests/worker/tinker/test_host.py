"""The hosting loop against a real Redis, with a real lease: calls run in seq_id order whatever order they
arrive in, a refused seq_id is skipped, each future is settled, an idle host saves the model's state and the
next host continues from it exactly, and a finished session ends the hosting."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from shared import keys
from shared import tinker_store as ts
from shared.config import TrainConfig
from shared.jobs import JobRecord, JobStatus
from shared.settings import Settings
from shared.store import JobStore
from shared.tinker_ops import ForwardOp, ForwardResult, OptimStepOp, SaveOp, TinkerCall, TinkerDatum
from tests.service import wait_until
from worker.jobs.lease import LeaseKeeper
from worker.tinker.host import ACTIVE_S, IDLE_STATE, Client, HostOutcome, host_model

DATA = [TinkerDatum(tokens=[5, 9, 13, 2], target_tokens=[9, 13, 2, 7], weights=[0.0, 1.0, 1.0, 1.0])]


class Hosting:
    """One hosting job run in a thread, as a worker child runs it."""

    def __init__(self, client: redis.Redis, settings: Settings, model_id: str, model_dir: Path, out: Path) -> None:
        self.client, self.settings = client, settings
        self.job_id = f"job-{uuid.uuid4().hex[:8]}"
        store = JobStore(client)
        record = JobRecord(id=self.job_id, kind="tinker", status=JobStatus.queued, created_at=0,
                           config=TrainConfig(model_name=str(model_dir)), dataset_path="", output_dir=str(out),
                           model_dir=str(model_dir), tinker_model=model_id)  # fmt: skip
        assert store.admit(record, max_slots=50, queue_timeout_s=60).admitted
        token = uuid.uuid4().hex
        assert store.claim(self.job_id, token=token, lease_s=30, worker="w") == "ok"
        self.lease = LeaseKeeper(store, self.job_id, token, 30)
        self.outcome: HostOutcome | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.record = record

    def _run(self) -> None:
        with self.lease:
            try:
                self.outcome = host_model(self.record, self.settings, self.lease, None)
            except BaseException as exc:
                self.error = exc

    def __enter__(self) -> Hosting:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lease.cancelled.set()
        self.thread.join(timeout=30)


def _model(client: redis.Redis, model_dir: Path, **update: object) -> ts.TinkerModel:
    model = ts.TinkerModel(model_id=f"s{uuid.uuid4().hex[:6]}:train:0", session_id="s", base_model="tiny", rank=4,
                           create_request_id=uuid.uuid4().hex, **update)  # type: ignore[arg-type]  # fmt: skip
    ts.new_future(client, model.create_request_id or "", model.model_id)
    ts.save_model(client, model)
    return model


def _call(model_id: str, seq_id: int, op: object) -> TinkerCall:
    return TinkerCall(request_id=uuid.uuid4().hex, model_id=model_id, seq_id=seq_id, op=op)  # type: ignore[arg-type]


def _result(client: redis.Redis, call: TinkerCall) -> ts.Future:
    def settled() -> bool:
        future = ts.get_future(client, call.request_id)
        return future is not None and future.state != "pending"

    wait_until(settled, timeout=60, every=0.05, what=f"call {call.seq_id} to be settled")
    future = ts.get_future(client, call.request_id)
    assert future is not None
    return future


def _loss(client: redis.Redis, call: TinkerCall) -> float:
    future = _result(client, call)
    assert future.state == "done", future.error
    assert isinstance(future.result, ForwardResult)
    return future.result.metrics["loss:sum"]


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(base_path=tmp_path, redis_url=redis_url, tinker_idle_timeout_s=2.0)


def test_calls_run_in_seq_order_and_an_idle_host_saves_what_the_next_continues_from(
    redis_client: redis.Redis, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = _model(redis_client, tiny_model_dir)
    mid = model.model_id
    fb = ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=DATA)
    forward = ForwardOp(op="forward", loss_fn="cross_entropy", data=DATA)
    with Hosting(redis_client, settings, mid, tiny_model_dir, tmp_path / "m") as hosting:
        created = _result(redis_client, ts.TinkerCall(request_id=model.create_request_id or "", model_id=mid, seq_id=0,
                                                        op=OptimStepOp(learning_rate=0)))  # fmt: skip
        assert created.state == "done"
        # optim_step (2) arrives before the forward_backward (1) it follows; seq 4 was refused by the API
        calls = [_call(mid, 2, OptimStepOp(learning_rate=0.05)), _call(mid, 1, fb), _call(mid, 3, forward),
                 _call(mid, 5, forward)]  # fmt: skip
        for call in calls:
            ts.push_call(redis_client, call)
        before = _loss(redis_client, calls[1])
        after = _loss(redis_client, calls[2])
        assert after < before  # the step ran between them, not before the forward_backward
        assert _loss(redis_client, calls[3]) == pytest.approx(after, rel=1e-6)  # the gap at 4 was skipped
        wait_until(lambda: hosting.outcome is not None, timeout=30, every=0.1, what="the host to go idle")
    assert hosting.outcome is not None and hosting.outcome.kind == "idle", hosting.error
    saved = ts.get_model(redis_client, mid)
    assert saved is not None and saved.job_id is None and saved.load_optimizer
    assert saved.load_from == str(settings.volume.tinker_model(mid) / IDLE_STATE)
    assert ts.hosts(redis_client) == []
    assert ts.next_seq_id(redis_client, mid) == 6

    # the next hosting continues where the idle one stopped: same loss, same optimizer state
    with Hosting(redis_client, settings, mid, tiny_model_dir, tmp_path / "m"):
        again = _call(mid, 6, forward)
        ts.push_call(redis_client, again)
        assert _loss(redis_client, again) == pytest.approx(after, rel=1e-6)


def test_bad_calls_fail_their_futures_and_saves_are_listed(
    redis_client: redis.Redis, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = _model(redis_client, tiny_model_dir)
    mid = model.model_id
    out = tmp_path / "m"
    with Hosting(redis_client, settings.model_copy(update={"tinker_idle_timeout_s": 3}), mid, tiny_model_dir, out) as h:
        bad = _call(mid, 1, ForwardOp(op="forward", loss_fn="cross_entropy",
                                      data=[TinkerDatum(tokens=[1, 10**7], target_tokens=[2, 3], weights=[1, 1])]))  # fmt: skip
        save = _call(mid, 2, SaveOp(op="save_weights", folder=str(out / "weights" / "a"), name="a",
                                    tinker_path=f"tinker://{mid}/weights/a"))  # fmt: skip
        for call in (bad, save):
            ts.push_call(redis_client, call)
        failed = _result(redis_client, bad)
        assert failed.state == "failed" and failed.error and failed.error.startswith("forward")
        assert _result(redis_client, save).state == "done"
        listed = ts.checkpoints(redis_client, mid)
        assert [c.tinker_path for c in listed] == [f"tinker://{mid}/weights/a"]
        assert (out / "weights" / "a" / "adapter_config.json").is_file()
        ts.save_model(redis_client, model.model_copy(update={"closed": True}))
        wait_until(lambda: h.outcome is not None, timeout=30, every=0.1, what="the host to end with its session")
    assert h.outcome is not None and h.outcome.kind == "idle"  # its only client left; then the idle timeout


def test_two_clients_share_one_base_and_train_independently(
    redis_client: redis.Redis, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = _model(redis_client, tiny_model_dir)
    second = _model(redis_client, tiny_model_dir)
    fb = ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=DATA)
    forward = ForwardOp(op="forward", loss_fn="cross_entropy", data=DATA)
    busy = settings.model_copy(update={"tinker_idle_timeout_s": 60})
    with Hosting(redis_client, busy, first.model_id, tiny_model_dir, tmp_path / "m") as hosting:
        redis_client.rpush(keys.tinker_host_attach_key(hosting.job_id), second.model_id)
        joined = _result(redis_client, TinkerCall(request_id=second.create_request_id or "", model_id=second.model_id,
                                                  seq_id=0, op=OptimStepOp(learning_rate=0)))  # fmt: skip
        assert joined.state == "done", joined.error
        (host,) = ts.hosts(redis_client)
        assert host.job_id == hosting.job_id and host.clients == sorted([first.model_id, second.model_id])
        b_before = _call(second.model_id, 1, forward)
        ts.push_call(redis_client, b_before)
        before = _loss(redis_client, b_before)
        steps = [_call(first.model_id, 1, fb), _call(first.model_id, 2, OptimStepOp(learning_rate=0.1)),
                 _call(first.model_id, 3, forward)]  # fmt: skip
        for call in steps:
            ts.push_call(redis_client, call)
        assert _loss(redis_client, steps[2]) < _loss(redis_client, steps[0])  # the first client learned
        b_after = _call(second.model_id, 2, forward)
        ts.push_call(redis_client, b_after)
        assert _loss(redis_client, b_after) == pytest.approx(before, rel=1e-6)  # the second did not move

        # both clients' forward calls, queued together, run as one step with the same results as alone
        pair = [_call(first.model_id, 4, forward), _call(second.model_id, 3, forward)]
        for call in pair:
            ts.push_call(redis_client, call)
        assert _loss(redis_client, pair[0]) == pytest.approx(_loss(redis_client, steps[2]), rel=1e-6)
        assert _loss(redis_client, pair[1]) == pytest.approx(before, rel=1e-6)

        # the second's session finishes: it leaves without a save, the first stays
        ts.save_model(redis_client, second.model_copy(update={"closed": True}))
        wait_until(lambda: hosting.error is not None or ts.hosts(redis_client)[0].clients == [first.model_id], timeout=20, every=0.1,
                   what="the closed client to leave the host")  # fmt: skip
        assert hosting.error is None, repr(hosting.error)
        left = ts.get_model(redis_client, second.model_id)
        assert left is not None and left.load_from is None


def test_a_client_counts_as_in_a_loop_only_while_its_next_forward_call_is_due(tmp_path: Path) -> None:
    model = ts.TinkerModel(model_id="s:train:0", session_id="s", base_model="tiny", rank=4)
    client = Client(model, cast(Any, None), tmp_path, next_seq=1)
    client.forward_arrived(100.0)
    assert not client.in_loop(100.01)  # one call says nothing of a pace
    for at in (100.03, 100.06, 100.09):  # a loop sending a forward call every 30 ms
        client.forward_arrived(at)
    assert client.cadence == pytest.approx(0.03)
    assert client.in_loop(100.11)  # its next call is due
    assert not client.in_loop(100.16)  # two paces without one: it stopped (to sample, say); no one waits for it
    client.forward_arrived(110.0)  # back after 10 s: the pause is not its pace ...
    assert client.cadence is not None
    assert client.in_loop(110.0 + min(ACTIVE_S, 2 * client.cadence) - 0.01)
    assert not client.in_loop(110.0 + ACTIVE_S)  # ... and the wait is bounded whatever the pace
