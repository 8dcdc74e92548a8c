"""The benchmark targets of issue 18, in one place: what `bench.train`, `bench.time_to_adapter` and the GPU
check's report judge their figures against. A missed target is reported, never failed."""

from __future__ import annotations

# On one H200 at Qwen2.5-0.5B's shape and the seed's defaults (LoRA r=8 all-linear, lm_head + embed_tokens).
GPU_SPEEDUP_B4 = 10.0  # fast vs TRL tokens/s at batch 4, at least
GPU_MEMORY_B4 = 0.5  # fast vs TRL peak memory at batch 4, at most
GPU_MFU_B16 = 0.35  # fast's useful MFU at batch 16, at least
GPU_TOKENS_B16 = 54_000  # the published best for a ~0.6B LoRA on an H100, tokens/s
TTA_WARM = 0.5  # fast's time to adapter on a warm worker vs TRL's warm, at most
TTA_COLD = 1.0  # fast's time to adapter on a cold worker vs TRL's cold, at most

# On a CPU at the seed's defaults.
CPU_SPEEDUP = 3.0  # fast vs TRL tokens/s, at least
CPU_MEMORY = 0.5  # fast vs TRL peak memory (RSS), at most


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def steady_state_lines(
    device: str, batch_size: int, speedup: float, memory: float, useful_mfu: float | None
) -> list[str]:
    """The steady-state targets that apply to a run on `device` at `batch_size`, each with its verdict."""
    if device == "cpu":
        ok = speedup >= CPU_SPEEDUP and memory <= CPU_MEMORY
        return [f"CPU target: fast >= {CPU_SPEEDUP:.0f}x TRL tokens/s at <= {CPU_MEMORY}x memory: {verdict(ok)}"
                f" ({speedup:.2f}x, {memory:.2f}x)"]  # fmt: skip
    lines = []
    if batch_size == 4:
        lines.append(f"GPU target: fast >= {GPU_SPEEDUP_B4:.0f}x TRL tokens/s at batch 4: "
                     f"{verdict(speedup >= GPU_SPEEDUP_B4)} ({speedup:.2f}x)")  # fmt: skip
        lines.append(f"GPU target: fast <= {GPU_MEMORY_B4}x TRL peak memory at batch 4: "
                     f"{verdict(memory <= GPU_MEMORY_B4)} ({memory:.2f}x)")  # fmt: skip
    if batch_size == 16:
        ok = useful_mfu is not None and useful_mfu >= GPU_MFU_B16
        shown = "n/a" if useful_mfu is None else f"{useful_mfu:.1%}"
        lines.append(f"GPU target: fast useful MFU >= {GPU_MFU_B16:.0%} at batch 16: {verdict(ok)} ({shown})")
    return lines
