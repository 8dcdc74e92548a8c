"""Saving the training state without stopping training: copied on the training thread, written on another.

A state is ~1.7 GB for a 0.5B model (the fp32 trained embedding and its two Adam moments); writing it
with `torch.save` on the training thread would leave the GPU idle for the whole write. So `save` only
takes a snapshot: each tensor the loop will go on mutating (trained parameters, optimizer state, the
epoch's accumulators) is copied into a host buffer -- on CUDA a pinned one, with `non_blocking=True`,
followed by a CUDA event; on a CPU a plain synchronous copy -- and the write
(`worker.training.train_state.save_train_state`: staged folder, `state.json` last, atomic rename, older
states pruned) runs on one background thread that first waits for the event.

Why the snapshot is consistent: the copies are enqueued on the current stream before the next step's
kernels (the fast engine's side streams wait for the current stream before they start), so stream order
has them read the step-N values before step N+1 writes; on a CPU they are done when `save` returns.

At most one write is in flight, and the host buffers are reused from one save to the next (allocating
and pinning 1.7 GB each time would cost more than the copy): `save` waits for the previous write, whose
buffers it is about to overwrite. The loop asks `idle` before a time-triggered save so that one never
waits (it is simply taken a step later), while a pause, an epoch end or an exact-step save waits.

A write that fails is never lost: it is reported as a warning event (on the training thread, which
`RunControl.emit` requires) at the next call; `flush` raises it instead, for a pause, whose state the
resume depends on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from shared import events
from shared.events import EventPayload
from worker.training.train_state import LoopState, save_train_state

EmitFn = Callable[[EventPayload, str], None]  # (typed payload, message): `RunControl.emit`
WriteFn = Callable[[Path, LoopState, str], Path]  # (folder, host state, fingerprint) -> the saved state


class StateSaveError(Exception):
    """A state that had to be saved (a pause's) could not be written."""


class StateSaver(Protocol):
    """What `train_loop` hands its state to (`LoopHooks.save_state`). Called on the training thread."""

    def idle(self) -> bool:
        """True when no save is being written (a time-triggered save is then taken without waiting)."""

    def save(self, state: LoopState) -> None:
        """Take `state`, whose tensors are the live ones: copy them before returning; write them later."""

    def flush(self) -> None:
        """Return once every state taken is written; raise `StateSaveError` if the last one failed."""


def _write(folder: Path, state: LoopState, fingerprint: str) -> Path:
    return save_train_state(folder, state, fingerprint=fingerprint)


class StateWriter:
    """A `StateSaver` writing to `folder` with `fingerprint` from one background thread. Use it as a
    context manager (or call `close`): leaving waits for the write in flight, so that nothing writes
    into `folder` once the run is over (its state is deleted after the adapter is saved).

    `complete` fills in, on the training thread, what the run rather than the loop accumulated (eval
    losses, checkpoints); `write` is the write itself (`save_train_state`; a test may slow it down).
    """

    def __init__(
        self,
        folder: Path,
        *,
        fingerprint: str,
        emit: EmitFn,
        complete: Callable[[LoopState], None] | None = None,
        write: WriteFn = _write,
    ) -> None:
        self.folder, self._fingerprint, self._emit, self._complete, self._write = (
            folder, fingerprint, emit, complete, write
        )  # fmt: skip
        self._buffers = _HostBuffers()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._pending: tuple[int, Future[Path]] | None = None  # (step, its write) not yet settled

    def idle(self) -> bool:
        if self._pending is not None and not self._pending[1].done():
            return False
        self._settle(strict=False)  # reports a failed write
        return True

    def save(self, state: LoopState) -> None:
        self._settle(strict=False)  # the buffers the snapshot overwrites are those the last write reads
        if self._complete is not None:
            self._complete(state)
        snapshot = self._buffers.snapshot(state)
        self._pending = (state.step, self._pool.submit(self._run, snapshot))

    def flush(self) -> None:
        self._settle(strict=True)

    def close(self) -> None:
        """Wait for the write in flight (a failure is reported as a warning, not raised) and stop the thread."""
        try:
            self._settle(strict=False)
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> StateWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _run(self, snapshot: _Snapshot) -> Path:
        for event in snapshot.copied:
            event.synchronize()  # the device->host copies are done; the buffers hold the step's values
        snapshot.sources.clear()  # the device tensors may be freed (and their memory reused) from here on
        return self._write(self.folder, snapshot.state, self._fingerprint)

    def _settle(self, *, strict: bool) -> None:
        """Wait for the write in flight, if any, and report (or, `strict`, raise) its failure."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        exc = future.exception()
        if exc is None:
            return
        if strict:
            raise StateSaveError(f"saving the training state of step {step} failed: {exc}") from exc
        self._emit(
            events.warning(component="train_state", step=step, error=f"{type(exc).__name__}: {exc}"),
            f"saving the training state of step {step} failed ({type(exc).__name__}: {exc}); "
            "a resume would start from the state saved before it",
        )


@dataclasses.dataclass(slots=True)
class _Snapshot:
    state: LoopState  # its tensors are the host buffers
    copied: list[torch.cuda.Event]  # recorded after the copies, one per device copied from
    # The device tensors copied from, kept alive until the copies are done: one freed sooner (an epoch's
    # loss sum is replaced every step) could have its memory reused by another stream while still read.
    sources: list[torch.Tensor]


class _HostBuffers:
    """Host copies of a state's tensors, one buffer per place in the state, reused from save to save."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def snapshot(self, state: LoopState) -> _Snapshot:
        sources: list[torch.Tensor] = []
        host = dataclasses.replace(
            state,
            params=self._copy(state.params, ("params",), sources),
            optimizer=self._copy(state.optimizer, ("optimizer",), sources),
            epoch_loss_sum=self._copy(state.epoch_loss_sum, ("loss_sum",), sources),
            epoch_accuracy_sum=self._copy(state.epoch_accuracy_sum, ("accuracy_sum",), sources),
        )  # the RNG states are fresh host copies already (`capture_rng`)
        copied = []
        for device in {t.device for t in sources if t.is_cuda}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            copied.append(event)
        return _Snapshot(host, copied, sources)

    def _copy(self, value: Any, key: tuple[Any, ...], sources: list[torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value.detach(), key, sources)
        if isinstance(value, dict):
            return {k: self._copy(v, (*key, k), sources) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._copy(v, (*key, i), sources) for i, v in enumerate(value))
        return value  # numbers, strings, None: immutable

    def _copy_tensor(self, tensor: torch.Tensor, key: tuple[Any, ...], sources: list[torch.Tensor]) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            # Pinned: only page-locked memory lets a device->host copy run asynchronously.
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        sources.append(tensor)
        return buffer
