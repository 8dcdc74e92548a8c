"""The base model kept loaded between jobs of the same model in one process, with a memory check.

A worker child runs one job after another. Loading the base (and compiling for it) costs seconds to
minutes, so the base stays here after a job: `acquire` hands it to the next job whose load plan
(model, dtype, attention implementation, device) is the same, else loads the one asked for (dropping
the other first: one base per process, so memory never holds two). `release` takes the adapter off
again (`worker.training.base_snapshot`); a base that does not come back exactly as loaded is dropped.
`settle`, once the job has ended and its last references are gone, frees what the job left and checks
the device's allocated memory is about the resident base's size and the host's RSS has not grown past
a bound since the first job on this base; it says when the process should be replaced instead.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from shared.config import EngineName, TrainConfig
from worker.training.base_snapshot import BaseSnapshot, problems, restore
from worker.training.model_loading import EventCallback, LoadPlan, load_planned, plan_load

log = logging.getLogger(__name__)

# Device memory a job may leave allocated beyond the base's own (allocator rounding, small caches).
_DEVICE_SLACK_BYTES = 256 * 2**20
_DEVICE_SLACK_FRACTION = 0.05


@dataclass
class Acquired:
    """A base for one job: `reused` from the previous job, or loaded (`reason` says why it was not reused)."""

    model: PreTrainedModel
    tokenizer: Any
    engine: EngineName
    reused: bool
    reason: str


@dataclass
class _Resident:
    plan: LoadPlan
    model: PreTrainedModel
    tokenizer: Any
    snapshot: BaseSnapshot
    in_use: bool = False  # handed to a job and not released yet
    rss_baseline: int | None = None  # host RSS after the first job on this base settled


class ResidentBase:
    """At most one loaded base, kept between jobs (see the module's docstring)."""

    def __init__(self) -> None:
        self._resident: _Resident | None = None
        self._dropped: str | None = None  # why the last resident base was dropped, for the next job's event

    @property
    def plan(self) -> LoadPlan | None:
        return self._resident.plan if self._resident is not None else None

    def acquire(self, config: TrainConfig, device: torch.device, on_event: EventCallback | None = None) -> Acquired:
        plan = plan_load(config, device, on_event)
        resident = self._resident
        if resident is not None and resident.plan == plan and not resident.in_use:
            resident.in_use = True
            # The tokenizer is mutable (a job sets its padding side when it saves): each job gets a copy.
            return Acquired(resident.model, copy.deepcopy(resident.tokenizer), plan.engine, True, "")
        if resident is None:
            reason = self._dropped or "first job on this worker"
        elif resident.in_use:
            reason = "the previous job never gave the base back"
        else:
            reason = f"the previous job used {_describe(resident.plan, plan)}"
        self.drop(reason)
        model, tokenizer = load_planned(plan)
        self._resident = _Resident(plan, model, tokenizer, BaseSnapshot.take(model), in_use=True)
        self._dropped = None
        return Acquired(model, copy.deepcopy(tokenizer), plan.engine, False, reason)

    def release(self) -> None:
        """Take the job's adapter off the resident base and check it is as loaded; else drop it. The job's
        PeftModel may live on (a traceback holds it): the base no longer reaches any of its modules."""
        resident = self._resident
        if resident is None or not resident.in_use:
            return
        base = resident.model
        try:
            restore(base, resident.snapshot)
            found = problems(base, resident.snapshot)
        except Exception as exc:  # whatever went wrong, a base in an unknown state is not reused
            found = [f"{type(exc).__name__}: {exc}"]
        if found:
            log.warning("resident base dropped: %s", "; ".join(found))
            self.drop(f"the previous job's base failed its check ({'; '.join(found)})")
            return
        resident.in_use = False

    def drop(self, reason: str) -> None:
        if self._resident is None:
            return
        self._resident = None
        self._dropped = reason
        free_memory()

    def settle(self, *, max_rss_growth_bytes: int) -> str | None:
        """After a job: free what it left and check memory. A reason to replace this process, or None.

        Call it once the job's objects are unreachable (not from inside an exception handler that
        still holds the job's frames). On a "replace" answer the resident base is already dropped.
        """
        resident = self._resident
        if resident is not None and resident.in_use:
            self.drop("the previous job never gave the base back")
            resident = None
        free_memory()
        device = resident.plan.device if resident is not None else None
        expected = resident.snapshot.device_bytes if resident is not None else 0
        for index in range(torch.cuda.device_count() if torch.cuda.is_initialized() else 0):
            held = torch.cuda.memory_allocated(index)
            mine = expected if device is not None and device.type == "cuda" and (device.index or 0) == index else 0
            if held > mine + max(_DEVICE_SLACK_BYTES, _DEVICE_SLACK_FRACTION * mine):
                self.drop("the worker was replaced")
                return f"cuda:{index} still has {held / 2**20:,.0f} MiB allocated after the job ({mine / 2**20:,.0f} MiB is the base)"
        rss = host_rss()
        if resident is None or rss is None:
            return None
        if resident.rss_baseline is None:
            resident.rss_baseline = rss
        elif rss > resident.rss_baseline + max_rss_growth_bytes:
            grown = (rss - resident.rss_baseline) / 2**20
            self.drop("the worker was replaced")
            return f"host memory grew {grown:,.0f} MiB since the first job on this base"
        return None


def free_memory() -> None:
    """Give back what unreachable objects held: Python's cycles, the CUDA caching allocator's free
    blocks, and (glibc) the C heap's free pages, so RSS and allocated memory reflect what is live."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def host_rss() -> int | None:
    """This process's resident set size in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _describe(old: LoadPlan, new: LoadPlan) -> str:
    if old.model_name != new.model_name:
        return f"another model ({old.model_name})"
    differs = [
        f"{name} {getattr(old, name)}"
        for name in ("dtype", "attn_implementation", "device")
        if getattr(old, name) != getattr(new, name)
    ]
    return "the same model with another " + ", ".join(differs)


_PROCESS_RESIDENT: ResidentBase | None = None


def process_resident() -> ResidentBase:
    """The one resident base of this process (a worker child keeps it between its jobs)."""
    global _PROCESS_RESIDENT
    if _PROCESS_RESIDENT is None:
        _PROCESS_RESIDENT = ResidentBase()
    return _PROCESS_RESIDENT


def compile_cache_location() -> dict[str, Any]:
    """Where torch.compile keeps its on-disk caches in this process, and whether they are on."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return {
        "compile_cache": cache_dir(),
        "fx_graph_cache": bool(inductor_config.fx_graph_cache),
        "autograd_cache": bool(functorch_config.enable_autograd_cache),
    }
