"""A hosting job's life: a Tinker training client's model resident in this worker child, running its calls.

The API queues a model's calls on its Redis list (`shared.tinker_store`); this loop pops them and runs them
strictly in the client's `seq_id` order (a call that arrives early waits for the ones before it; a seq_id the
API refused never arrives, so a gap that stays open past `GAP_WAIT_S` is skipped), settling each call's
future with its result, or its error (category "user" for a call the model cannot run, "server" otherwise).

The job ends, its slot and memory freed, when:
- the client goes idle (`LORA_TINKER_IDLE_TIMEOUT_S` without a call): the model's full state (adapter and
  optimizer) is saved and recorded as the model's `load_from`, so the next call hosts it again from there;
- the worker stops (SIGTERM): the same save, and the job goes back to the queue, first in line;
- its session finishes, or the job is cancelled: nothing is saved.
A killed worker saves nothing: its pending futures are failed by the API (the job's lease lapses), and the
client's last `save_state` is what a new training client loads.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import redis
import torch
from pydantic import BaseModel

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
from shared.tinker_store import CheckpointInfo, SamplingSession, TinkerModel
from worker.jobs.lease import LeaseKeeper
from worker.tinker.lora import apply_lora
from worker.tinker.trainer import CheckpointError, TinkerTrainer
from worker.training.base_name import recorded_base
from worker.training.model_loading import load_base_model, pick_device
from worker.training.resident import ResidentBase

log = logging.getLogger(__name__)

POP_WAIT_S = 0.5  # one BLPOP's wait: how soon a stop request or an idle timeout is noticed
GAP_WAIT_S = 1.0  # how long a missing seq_id holds back the calls after it (see the module docstring)
MODEL_CHECK_S = 2.0  # how often the model's record is read again (its session may have finished)
IDLE_STATE = ".idle-state"  # the model's state saved when its host stops, in the job's output folder


@dataclass
class HostOutcome:
    """How the hosting ended: `kind` is "idle", "handed_back", "closed", "cancelled" or "stopped"."""

    kind: str
    message: str
    calls: int


class ModelHost:
    def __init__(self, record: JobRecord, settings: Settings, lease: LeaseKeeper, client: redis.Redis) -> None:
        assert record.tinker_model is not None
        self.record, self.settings, self.lease, self.client = record, settings, lease, client
        self.model_id = record.tinker_model
        self.output = Path(record.output_dir)
        self.trainer: TinkerTrainer | None = None
        self.calls = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------ loading

    def load(self, resident: ResidentBase | None) -> TinkerModel:
        model = self._model()
        base_dir = self.record.model_dir or self.record.config.model_name
        self.lease.status(f"Loading model {self.record.base_model or base_dir}...")
        config = TrainConfig(model_name=base_dir, engine="fast")
        device = pick_device()
        started = time.monotonic()
        if resident is not None:
            got = resident.acquire(config, device, self.lease.emit)
            base, engine = got.model, got.engine
        else:
            base, _tokenizer, engine = load_base_model(config, device, self.lease.emit)
        peft_model = apply_lora(base, rank=model.rank, seed=model.seed, attn=model.train_attn, mlp=model.train_mlp,
                                unembed=model.train_unembed)  # fmt: skip
        self.trainer = TinkerTrainer(peft_model, engine=engine, base=recorded_base(base_dir), rank=model.rank)
        if model.load_from:
            self.trainer.load(Path(model.load_from), optimizer=model.load_optimizer)
        seconds = time.monotonic() - started
        loaded = f" from {model.load_from}" if model.load_from else ""
        self.lease.emit(InfoNotice(), f"Tinker model {self.model_id} ready on {device.type} in {seconds:.1f} s{loaded}")
        self.lease.status(f"Hosting Tinker model {self.model_id}")
        return model

    def _model(self) -> TinkerModel:
        model = ts.get_model(self.client, self.model_id)
        if model is None:
            raise RuntimeError(f"Tinker model {self.model_id} is not known (its record is gone)")
        return model

    def settle_created(self, model: TinkerModel, error: str | None = None) -> None:
        """Answer the create (or create-from-state) future, once: the model is ready, or could not be."""
        request_id = model.create_request_id
        if not request_id:
            return
        future = ts.get_future(self.client, request_id)
        if future is None or future.state != "pending":
            return
        if error is None:
            ts.complete(self.client, request_id, CreatedResult(model_id=self.model_id))
        else:
            ts.fail(self.client, request_id, error, "user")

    # ------------------------------------------------------------------ the loop

    def serve(self) -> HostOutcome:
        next_seq = ts.next_seq_id(self.client, self.model_id)
        waiting: dict[int, TinkerCall] = {}
        gap_since: float | None = None
        last_call = last_check = time.monotonic()
        while True:
            if self.lease.should_stop():
                return self._stop()
            now = time.monotonic()
            if now - last_check >= MODEL_CHECK_S:
                last_check = now
                if self._model().closed:
                    return HostOutcome("closed", f"the session of Tinker model {self.model_id} finished", self.calls)
            if not waiting and now - last_call >= self.settings.tinker_idle_timeout_s:
                return self._idle()
            call = ts.pop_call(self.client, self.model_id, POP_WAIT_S if not waiting else 0.05)
            if call is not None:
                if call.seq_id < next_seq:
                    log.info("model %s: seq_id %d ran already; ignoring its repeat", self.model_id, call.seq_id)
                else:
                    waiting[call.seq_id] = call
            if waiting and next_seq not in waiting:
                gap_since = gap_since or time.monotonic()
                if time.monotonic() - gap_since >= GAP_WAIT_S:
                    log.warning("model %s: seq_id %d never came; going on at %d", self.model_id, next_seq, min(waiting))
                    next_seq = min(waiting)
            while next_seq in waiting:
                gap_since = None
                self.run(waiting.pop(next_seq))
                next_seq += 1
                ts.set_next_seq_id(self.client, self.model_id, next_seq)
                last_call = time.monotonic()

    def run(self, call: TinkerCall) -> None:
        trainer = self.trainer
        assert trainer is not None
        op = call.op
        name = op.op
        result: BaseModel
        try:
            if isinstance(op, ForwardOp):
                result = trainer.forward(op)
                if op.op == "forward_backward":
                    self.losses.append(result.metrics["loss:sum"])
            elif isinstance(op, OptimStepOp):
                result = trainer.optim_step(op)
                self._publish(op.learning_rate, result.metrics.get("grad_norm:mean"))
            elif isinstance(op, SaveOp):
                result = self._save(op)
            elif isinstance(op, LoadOp):
                trainer.load(Path(op.folder), optimizer=op.optimizer)
                result = LoadResult(path=op.tinker_path)
            else:
                assert isinstance(op, UnloadOp)
                result = UnloadResult(model_id=self.model_id)
        except (CheckpointError, ValueError, IndexError) as exc:
            log.info("model %s: %s (seq %d) refused: %s", self.model_id, name, call.seq_id, exc)
            ts.fail(self.client, call.request_id, f"{name}: {exc}", "user")
        except Exception as exc:
            log.error("model %s: %s (seq %d) failed:\n%s", self.model_id, name, call.seq_id, traceback.format_exc())
            ts.fail(self.client, call.request_id, f"{name} failed on the worker: {type(exc).__name__}: {exc}", "server")
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
        else:
            ts.complete(self.client, call.request_id, result)
        self.calls += 1

    def _save(self, op: SaveOp) -> SaveResult:
        trainer = self.trainer
        assert trainer is not None
        training = op.op == "save_weights"
        folder = Path(op.folder)
        trainer.save(folder, optimizer=training, model_id=self.model_id, tinker_path=op.tinker_path)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        info = CheckpointInfo(tinker_path=op.tinker_path, checkpoint_type="training" if training else "sampler",
                              name=op.name, folder=str(folder), created_ms=ts.now_ms(), size_bytes=size)  # fmt: skip
        ts.add_checkpoint(self.client, self.model_id, info)
        if op.sampling_session_id is not None:
            model = self._model()
            ts.save_sampling_session(self.client, SamplingSession(
                sampling_session_id=op.sampling_session_id, session_id=model.session_id, base_model=model.base_model,
                model_dir=self.record.model_dir or self.record.config.model_name, adapter_dir=str(folder),
                model_path=op.tinker_path, created_ms=ts.now_ms(),
            ))  # fmt: skip
        return SaveResult(path=op.tinker_path, sampling_session_id=op.sampling_session_id)

    def _publish(self, lr: float, grad_norm: float | None) -> None:
        trainer = self.trainer
        assert trainer is not None
        loss = self.losses[-1] if self.losses else None
        self.lease.publish(Progress(current_step=trainer.steps, loss=loss, learning_rate=lr, grad_norm=grad_norm))

    # ------------------------------------------------------------------ endings

    def _save_state(self) -> Path:
        """The model's full state, for the next host: recorded as the model's `load_from`."""
        trainer = self.trainer
        assert trainer is not None
        folder = self.output / IDLE_STATE
        trainer.save(folder, optimizer=True, model_id=self.model_id, tinker_path=f"tinker://{self.model_id}/state")
        model = self._model()
        ts.save_model(self.client, model.model_copy(update={"load_from": str(folder), "load_optimizer": True}))
        return folder

    def _idle(self) -> HostOutcome:
        self._save_state()
        idle = self.settings.tinker_idle_timeout_s
        return HostOutcome("idle", f"no call for {idle:g} s: the model's state is saved and its slot freed; "
                           "its next call loads it again", self.calls)  # fmt: skip

    def _stop(self) -> HostOutcome:
        if self.lease.cancelled.is_set():
            return HostOutcome("cancelled", "cancelled by request", self.calls)
        if self.lease.pause_requested() and self.trainer is not None:
            self._save_state()
            if self.lease.handing_back:
                return HostOutcome("handed_back", "the worker is stopping: the model's state is saved; it is "
                                   "hosted again on the next free slot", self.calls)  # fmt: skip
            return HostOutcome("idle", "paused: the model's state is saved; its next call loads it again", self.calls)
        return HostOutcome("stopped", "stopped (lost its lease)", self.calls)


def host_model(record: JobRecord, settings: Settings, lease: LeaseKeeper, resident: ResidentBase | None) -> HostOutcome:
    """Load the job's Tinker model and serve its calls until the hosting ends (see the module docstring)."""
    from shared.store import connect

    client = connect(settings.redis_url)
    host = ModelHost(record, settings, lease, client)
    model = host._model()
    try:
        model = host.load(resident)
    except Exception as exc:
        host.settle_created(model, f"could not load the model: {type(exc).__name__}: {exc}")
        raise
    host.settle_created(model)
    return host.serve()
