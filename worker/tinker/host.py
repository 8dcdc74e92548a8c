"""A hosting job's life: Tinker training clients' models resident in this worker child, running their calls.

One hosting job holds one training slot and one loaded base model. Its first client is the job's own
(`JobRecord.tinker_model`); more clients on the same base join it while it has room
(`LORA_TINKER_CLIENTS_PER_WORKER`): the API pushes their model ids on the host's attach list. Each client is a
named adapter on the shared base, with its own AdamW state (`worker.tinker.trainer`); its calls run with its
adapter active.

The API queues each model's calls on its own Redis list (`shared.tinker_store`); this loop pops from all of them
(and the attach list) at once and runs each model's calls strictly in the client's `seq_id` order (a call that
arrives early waits for the ones before it; a seq_id the API refused never arrives, so a gap that stays open past
`GAP_WAIT_S` is skipped), settling each call's future with its result, or its error (category "user" for a call
the model cannot run, "server" otherwise).

A client leaves the host, its adapter and optimizer state saved (recorded as its model's `load_from`, its
`job_id` cleared, so its next call hosts it again from there, here or on another slot) when it goes idle
(`LORA_TINKER_IDLE_TIMEOUT_S` without a call) or the worker stops (SIGTERM); without a save when its session
finishes. The job ends once no client is left (after the idle timeout, so a returning client finds the base
still loaded), when the worker stops, or when it is cancelled. A killed worker saves nothing: the API fails its
clients' pending futures (the job's lease lapses), and each client's last `save_state` is what a new training
client loads.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
import torch
from pydantic import BaseModel

from shared import keys
from shared import tinker_store as ts
from shared.config import TrainConfig
from shared.events import InfoNotice
from shared.jobs import JobRecord, Progress
from shared.settings import Settings
from shared.tinker_ops import (
    CreatedResult,
    ForwardOp,
    LoadOp,
    LoadResult,
    OptimStepOp,
    SaveOp,
    SaveResult,
    TinkerCall,
    UnloadOp,
    UnloadResult,
)
from shared.tinker_store import CheckpointInfo, HostInfo, SamplingSession, TinkerModel
from worker.jobs import staging
from worker.jobs.lease import LeaseKeeper
from worker.tinker.lora import add_client_adapter
from worker.tinker.together import forward_together
from worker.tinker.trainer import CheckpointError, TinkerTrainer
from worker.training.base_name import recorded_base
from worker.training.forward_backward import FastStep
from worker.training.model_loading import load_base_model, pick_device
from worker.training.resident import ResidentBase

log = logging.getLogger(__name__)

POP_WAIT_S = 0.5  # one BLPOP's wait: how soon a stop request or an idle timeout is noticed
GAP_WAIT_S = 1.0  # how long a missing seq_id holds back the calls after it (see the module docstring)
MODEL_CHECK_S = 2.0  # how often the clients' records are read again (a session may have finished)
TOGETHER_WAIT_S = 0.02  # the longest a lone forward call waits for another client's (see _hold_for_company)
ACTIVE_S = 2.0  # at most this long after its last forward call is a client still counted as in a loop
IDLE_STATE = ".idle-state"  # a client's state saved when it leaves its host, in its model's folder


@dataclass
class HostOutcome:
    """How the hosting ended: `kind` is "idle", "stopping", "cancelled" or "stopped"."""

    kind: str
    message: str
    calls: int


@dataclass
class Client:
    """One training client on this host: its model's record, its trainer, and where its calls stand."""

    model: TinkerModel
    trainer: TinkerTrainer
    folder: Path  # the model's own folder on the volume (checkpoints, its idle state)
    next_seq: int
    waiting: dict[int, TinkerCall] = field(default_factory=dict)
    gap_since: float | None = None
    last_call: float = field(default_factory=time.monotonic)
    losses: list[float] = field(default_factory=list)
    last_forward: float | None = None  # when its last forward call arrived
    cadence: float | None = None  # the usual time between its forward calls' arrivals (a moving average)

    def forward_arrived(self, now: float) -> None:
        if self.last_forward is not None:
            gap = now - self.last_forward
            self.cadence = gap if self.cadence is None else 0.7 * self.cadence + 0.3 * gap
        self.last_forward = now

    def in_loop(self, now: float) -> bool:
        """Whether its next forward call is due about now: it came at a steady pace, and not much more than one
        pace ago (a client that stopped to sample or evaluate is not waited for)."""
        if self.last_forward is None or self.cadence is None:
            return False
        return now - self.last_forward < min(ACTIVE_S, 2 * self.cadence)


class ModelHost:
    def __init__(self, record: JobRecord, settings: Settings, lease: LeaseKeeper, client: redis.Redis) -> None:
        self.record, self.settings, self.lease, self.client = record, settings, lease, client
        self.base_dir = record.model_dir or record.config.model_name
        self.clients: dict[str, Client] = {}
        self.peft: Any = None  # the PeftModel the clients' adapters share
        self.base: Any = None
        self.engine: Any = None
        self.fast: FastStep | None = None
        self.device = pick_device()
        self.calls = 0
        self.together = 0  # steps that ran several clients' calls at once
        self.hold_since: float | None = None
        self.empty_since = time.monotonic()

    # ------------------------------------------------------------------ the base and the clients

    def load_base(self, resident: ResidentBase | None) -> None:
        self.lease.status(f"Loading model {self.record.base_model or self.base_dir}...")
        config = TrainConfig(model_name=self.base_dir, engine="fast")
        started = time.monotonic()
        if resident is not None:
            got = resident.acquire(config, self.device, self.lease.emit)
            self.base, self.engine = got.model, got.engine
        else:
            self.base, _tokenizer, self.engine = load_base_model(config, self.device, self.lease.emit)
        self.lease.emit(InfoNotice(), f"base {self.record.base_model or self.base_dir} ready on {self.device.type} "
                        f"in {time.monotonic() - started:.1f} s")  # fmt: skip

    def attach(self, model_id: str) -> None:
        """Put a client's adapter on the base (loading its saved state, if any) and answer its create future."""
        model = ts.get_model(self.client, model_id)
        if model is None or model.closed or model_id in self.clients:
            return
        adapter = f"client{len(self.clients)}_{abs(hash(model_id)) % 10**8}"
        try:
            self.peft = add_client_adapter(self.peft if self.peft is not None else self.base, adapter,
                                           rank=model.rank, seed=model.seed, attn=model.train_attn,
                                           mlp=model.train_mlp, unembed=model.train_unembed)  # fmt: skip
            trainer = TinkerTrainer(self.peft, engine=self.engine, base=recorded_base(self.base_dir), rank=model.rank,
                                    adapter=adapter, fast=self.fast)  # fmt: skip
            self.fast = trainer.fast
            if model.load_from:
                trainer.load(self._staged(model.load_from), optimizer=model.load_optimizer)
        except Exception as exc:
            log.error("model %s: could not host it:\n%s", model_id, traceback.format_exc())
            if self.peft is not None and adapter in self.peft.peft_config:
                self.peft.delete_adapter(adapter)
            self._settle_created(model, f"could not load the model: {type(exc).__name__}: {exc}")
            ts.save_model(self.client, model.model_copy(update={"job_id": None}))
            return
        folder = self.settings.volume.tinker_model(model_id)
        self.clients[model_id] = Client(model, trainer, folder, ts.next_seq_id(self.client, model_id))
        ts.save_model(self.client, model.model_copy(update={"job_id": self.record.id}))
        self._register()
        loaded = f" from {model.load_from}" if model.load_from else ""
        self.lease.emit(InfoNotice(), f"Tinker model {model_id} hosted (rank {model.rank}){loaded}")
        self._settle_created(model)
        self._status()

    def _settle_created(self, model: TinkerModel, error: str | None = None) -> None:
        """Answer the create (or create-from-state) future, once: the model is ready, or could not be."""
        request_id = model.create_request_id
        if not request_id:
            return
        future = ts.get_future(self.client, request_id)
        if future is None or future.state != "pending":
            return
        if error is None:
            ts.complete(self.client, request_id, CreatedResult(model_id=model.model_id))
        else:
            ts.fail(self.client, request_id, error, "user")

    def detach(self, model_id: str, *, save: bool) -> None:
        """Take a client off this host; with `save`, its state first, for whoever hosts it next."""
        client = self.clients.pop(model_id)
        update: dict[str, Any] = {"job_id": None}
        if save:
            folder = client.folder / IDLE_STATE
            client.trainer.save(folder, optimizer=True, model_id=model_id, tinker_path=f"tinker://{model_id}/state")
            update.update(load_from=self._published(folder), load_optimizer=True)
        client.trainer.remove()
        current = ts.get_model(self.client, model_id) or client.model
        if current.job_id == self.record.id:
            ts.save_model(self.client, current.model_copy(update=update))
        if not self.clients:
            self.empty_since = time.monotonic()
        self._register()
        self._status()

    def _register(self) -> None:
        """What the API reads to send a new client on the same base here (shared.tinker_store.HostInfo)."""
        info = HostInfo(job_id=self.record.id, model_dir=self.base_dir, clients=sorted(self.clients),
                        capacity=self.settings.tinker_clients_per_worker)  # fmt: skip
        ts.save_host(self.client, info)

    def _status(self) -> None:
        n = len(self.clients)
        self.lease.status(
            f"Hosting {n} Tinker training client{'s' if n != 1 else ''} on {self.record.base_model or self.base_dir}"
        )

    # ------------------------------------------------------------------ the loop

    def serve(self) -> HostOutcome:
        last_check = time.monotonic()
        attach_key = keys.tinker_host_attach_key(self.record.id)
        while True:
            if self.lease.should_stop():
                return self._stop()
            now = time.monotonic()
            if now - last_check >= MODEL_CHECK_S:
                last_check = now
                self._check_clients()
            for model_id, client in list(self.clients.items()):
                if not client.waiting and now - client.last_call >= self.settings.tinker_idle_timeout_s:
                    self.detach(model_id, save=True)
            if not self.clients and now - self.empty_since >= self.settings.tinker_idle_timeout_s:
                return self._end("idle", f"no client for {self.settings.tinker_idle_timeout_s:g} s")
            busy = any(c.waiting for c in self.clients.values())
            wait = 0.01 if self.hold_since is not None else 0.05 if busy else POP_WAIT_S
            watched = [attach_key] + [keys.tinker_calls_key(m) for m in self.clients]
            reply = self.client.blpop(watched, timeout=wait)
            if reply is not None:
                key, raw = reply  # type: ignore[misc]
                if key == attach_key:
                    self.attach(str(raw))
                else:
                    self._arrived(TinkerCall.model_validate_json(raw))
            if self._hold_for_company():
                continue
            self._run_together()
            for client in list(self.clients.values()):
                self._run_ready(client)

    def _arrived(self, call: TinkerCall) -> None:
        client = self.clients.get(call.model_id)
        if client is None:  # left meanwhile: back on its list, for its next host
            self.client.lpush(keys.tinker_calls_key(call.model_id), call.model_dump_json())
            return
        if call.seq_id < client.next_seq:
            log.info("model %s: seq_id %d ran already; ignoring its repeat", call.model_id, call.seq_id)
            return
        client.waiting[call.seq_id] = call
        if isinstance(call.op, ForwardOp):
            client.forward_arrived(time.monotonic())

    def _ready_forwards(self) -> list[tuple[Client, TinkerCall]]:
        """Each client's next call, where it has arrived and is a forward or forward_backward."""
        ready = []
        for client in self.clients.values():
            call = client.waiting.get(client.next_seq)
            if call is not None and isinstance(call.op, ForwardOp):
                ready.append((client, call))
        return ready

    def _hold_for_company(self) -> bool:
        """Wait a moment (`TOGETHER_WAIT_S`) before running a lone forward call while another client in the
        middle of a loop (`Client.in_loop`: its next forward call is due) has none ready: its call likely
        arrives within milliseconds, and the two then run as one step (`worker.tinker.together`)."""
        if self.fast is None or len(self.clients) < 2:
            return False
        ready = self._ready_forwards()
        if len(ready) != 1:
            self.hold_since = None
            return False
        now = time.monotonic()
        others_due = any(
            c is not ready[0][0] and c.next_seq not in c.waiting and c.in_loop(now) for c in self.clients.values()
        )
        if not others_due:
            self.hold_since = None
            return False
        self.hold_since = self.hold_since or now
        if now - self.hold_since >= TOGETHER_WAIT_S:
            self.hold_since = None
            return False
        return True

    def _run_together(self) -> None:
        """The clients' ready forward calls of one kind (two or more) as one packed step on the shared base."""
        ready = self._ready_forwards()
        for kind in ("forward_backward", "forward"):
            group = [(c, call) for c, call in ready if call.op.op == kind]
            if len(group) < 2 or self.fast is None:
                continue
            try:
                results = forward_together([(c.trainer, cast(ForwardOp, call.op)) for c, call in group])
            except Exception:  # refused or failed as a group: each call runs alone and answers for itself
                log.info("running %d %s calls together failed; running them one by one:\n%s", len(group), kind,
                         traceback.format_exc())  # fmt: skip
                continue
            for (client, call), result in zip(group, results, strict=True):
                if kind == "forward_backward":
                    client.losses.append(result.metrics["loss:sum"])
                ts.complete(self.client, call.request_id, result, ran=(call.model_id, call.seq_id))
                client.waiting.pop(call.seq_id)
                client.next_seq += 1
                client.last_call = time.monotonic()
                self.calls += 1
            self.together += 1

    def _run_ready(self, client: Client) -> None:
        if client.waiting and client.next_seq not in client.waiting:
            client.gap_since = client.gap_since or time.monotonic()
            if time.monotonic() - client.gap_since >= GAP_WAIT_S:
                log.warning("model %s: seq_id %d never came; going on at %d", client.model.model_id, client.next_seq,
                            min(client.waiting))  # fmt: skip
                client.next_seq = min(client.waiting)
        while client.next_seq in client.waiting:
            client.gap_since = None
            self.run(client, client.waiting.pop(client.next_seq))  # settling it moves the model's next seq_id on
            client.next_seq += 1
            client.last_call = time.monotonic()

    def _check_clients(self) -> None:
        for model_id in list(self.clients):
            model = ts.get_model(self.client, model_id)
            if model is None or model.closed:
                log.info("model %s: its session finished; it leaves the host", model_id)
                self.detach(model_id, save=False)

    def run(self, client: Client, call: TinkerCall) -> None:
        trainer = client.trainer
        op = call.op
        name = op.op
        ran = (call.model_id, call.seq_id)
        result: BaseModel
        try:
            if isinstance(op, ForwardOp):
                result = trainer.forward(op)
                if op.op == "forward_backward":
                    client.losses.append(result.metrics["loss:sum"])
            elif isinstance(op, OptimStepOp):
                result = trainer.optim_step(op)
                self._publish(client, op.learning_rate, result.metrics.get("grad_norm:mean"))
            elif isinstance(op, SaveOp):
                result = self._save(client, op)
            elif isinstance(op, LoadOp):
                trainer.load(self._staged(op.folder), optimizer=op.optimizer)
                result = LoadResult(path=op.tinker_path)
            else:
                assert isinstance(op, UnloadOp)
                result = UnloadResult(model_id=client.model.model_id)
        except (CheckpointError, ValueError, IndexError) as exc:
            log.info("model %s: %s (seq %d) refused: %s", call.model_id, name, call.seq_id, exc)
            ts.fail(self.client, call.request_id, f"{name}: {exc}", "user", ran)
        except Exception as exc:
            log.error("model %s: %s (seq %d) failed:\n%s", call.model_id, name, call.seq_id, traceback.format_exc())
            ts.fail(self.client, call.request_id, f"{name} failed on the worker: {type(exc).__name__}: {exc}", "server",
                    ran)  # fmt: skip
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
        else:
            ts.complete(self.client, call.request_id, result, ran)
        self.calls += 1

    def _local(self, path: str) -> Path:
        """A folder the API named, as it lies under this host's base path (hosts that share only the store)."""
        return self.settings.volume.localize(path, self.record.volume_base)

    def _staged(self, path: str) -> Path:
        """A saved state to load, staged from the object store when this host has no copy (another host saved it)."""
        folder = self._local(path)
        store = self.settings.store
        if store is not None and not folder.is_dir():
            store.pull_tree(folder)
        return folder

    def _published(self, folder: Path) -> str:
        """A folder this host saved, sent to the object store (where there is one); its name as the API knows it."""
        store = self.settings.store
        if store is not None:
            store.push_tree(folder)
        return staging.api_name(self.settings, self.record, folder)

    def _save(self, client: Client, op: SaveOp) -> SaveResult:
        training = op.op == "save_weights"
        folder = self._local(op.folder)
        model_id = client.model.model_id
        client.trainer.save(folder, optimizer=training, model_id=model_id, tinker_path=op.tinker_path)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        self._published(folder)  # complete in the store before the save is answered
        info = CheckpointInfo(tinker_path=op.tinker_path, checkpoint_type="training" if training else "sampler",
                              name=op.name, folder=op.folder, created_ms=ts.now_ms(), size_bytes=size)  # fmt: skip
        ts.add_checkpoint(self.client, model_id, info)
        if op.sampling_session_id is not None:
            ts.save_sampling_session(self.client, SamplingSession(
                sampling_session_id=op.sampling_session_id, session_id=client.model.session_id,
                base_model=client.model.base_model, model_dir=self.base_dir, adapter_dir=op.folder,
                model_path=op.tinker_path, created_ms=ts.now_ms(),
            ))  # fmt: skip
        return SaveResult(path=op.tinker_path, sampling_session_id=op.sampling_session_id)

    def _publish(self, client: Client, lr: float, grad_norm: float | None) -> None:
        loss = client.losses[-1] if client.losses else None
        steps = sum(c.trainer.steps for c in self.clients.values())
        self.lease.publish(Progress(current_step=steps, loss=loss, learning_rate=lr, grad_norm=grad_norm))

    # ------------------------------------------------------------------ endings

    def _stop(self) -> HostOutcome:
        if self.lease.cancelled.is_set():
            for model_id in list(self.clients):
                self.detach(model_id, save=False)
            return self._end("cancelled", "cancelled by request")
        if self.lease.pause_requested():
            for model_id in list(self.clients):
                self.detach(model_id, save=True)
            why = "the worker is stopping" if self.lease.shutdown.is_set() else "paused"
            return self._end("stopping", f"{why}: each client's state is saved; its next call hosts it again")
        return self._end("stopped", "stopped (lost its lease)")

    def _end(self, kind: str, message: str) -> HostOutcome:
        """Unregister; clients sent here meanwhile go back to being unhosted (their next call hosts them)."""
        ts.drop_host(self.client, self.record.id)
        while (raw := self.client.lpop(keys.tinker_host_attach_key(self.record.id))) is not None:
            model = ts.get_model(self.client, str(raw))
            if model is not None and model.job_id == self.record.id:
                ts.save_model(self.client, model.model_copy(update={"job_id": None}))
        if self.together:
            message += f" ({self.together} steps ran several clients' calls at once)"
        return HostOutcome(kind, message, self.calls)


def host_model(record: JobRecord, settings: Settings, lease: LeaseKeeper, resident: ResidentBase | None) -> HostOutcome:
    """Load the base, host the job's client and those that join, until the hosting ends (the module docstring)."""
    from shared.store import connect

    assert record.tinker_model is not None
    client = connect(settings.redis_url)
    host = ModelHost(record, settings, lease, client)
    try:
        try:
            host.load_base(resident)
        except Exception as exc:
            model = ts.get_model(client, record.tinker_model)
            if model is not None:
                host._settle_created(model, f"could not load the model: {type(exc).__name__}: {exc}")
            raise
        host.attach(record.tinker_model)
        return host.serve()
    finally:
        ts.drop_host(client, record.id)
        if resident is not None:
            resident.release()
