"""The plain TRL baseline the fast engine is measured against (the seed's approach).

`SFTTrainer` on padded batches (sdpa, whatever the model was loaded with), completion-only loss
from a ``completion_mask`` column over the same pre-tokenized `Example`s the engines train on,
bf16 only where the GPU supports it, no gradient checkpointing, no reporting, no saving.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from worker.training.example import IGNORE_INDEX, Example


def examples_to_dataset(examples: Sequence[Example]) -> Any:
    """A `datasets.Dataset` TRL 1.16 treats as pre-tokenized: ``input_ids`` + ``completion_mask``."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [list(e.input_ids) for e in examples],
            "completion_mask": [[int(t != IGNORE_INDEX) for t in e.labels] for e in examples],
        }
    )


def stub_tokenizer() -> Any:
    """A minimal tokenizer (pad and eos only) for models without one; TRL needs a pad token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def run_trl_baseline(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    max_steps: int | None = None,
    warmup_steps: int = 0,
    shuffle: bool = True,
) -> dict[str, Any]:
    """Train `model` with `SFTTrainer`; return throughput, peak memory and the final loss.

    Timing starts after `warmup_steps` optimizer steps (not counted) and ends after the last.
    With ``shuffle=False`` the examples are taken in the given order, `batch_size` at a time,
    so the real-token count of the timed steps is exact; with shuffling it is estimated from
    the mean tokens per step. `tokenizer` may be None (a pad/eos stub is used).
    """
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    use_cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    steps_per_epoch = -(-len(examples) // batch_size)
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    if warmup_steps >= total_steps:
        raise ValueError("warmup_steps must be fewer than the steps run")
    clock = _Clock(use_cuda)

    class _Callback(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup_steps:
                clock.start()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if warmup_steps == 0:
                clock.start()

    class _Trainer(SFTTrainer):  # type: ignore[misc]
        last_loss: torch.Tensor | None = None

        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            result = super().compute_loss(*args, **kwargs)
            loss = result[0] if isinstance(result, tuple) else result
            self.last_loss = loss.detach()
            return result

    with tempfile.TemporaryDirectory(prefix="trl-baseline-") as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            num_train_epochs=epochs,
            max_steps=max_steps if max_steps is not None else -1,
            learning_rate=learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=seed,
            bf16=use_cuda and torch.cuda.is_bf16_supported(),
            fp16=False,
            use_cpu=not use_cuda,
            gradient_checkpointing=False,
            max_length=None,
            completion_only_loss=True,
            train_sampling_strategy="random" if shuffle else "sequential",
            report_to="none",
            save_strategy="no",
            logging_steps=max(total_steps, 1),
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = _Trainer(
            model=model,
            args=config,
            train_dataset=examples_to_dataset(examples),
            processing_class=tokenizer if tokenizer is not None else stub_tokenizer(),
            callbacks=[_Callback()],
        )
        if use_cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        elapsed = clock.stop()
    timed_tokens = _timed_tokens(examples, batch_size, total_steps, warmup_steps, shuffle)
    return {
        "engine": "trl",
        "steps": total_steps - warmup_steps,
        "tokens": timed_tokens,
        "elapsed_s": elapsed,
        "tokens_per_second": timed_tokens / elapsed if elapsed > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(use_cuda),
        "final_loss": float(trainer.last_loss) if trainer.last_loss is not None else None,
    }


class _Clock:
    def __init__(self, use_cuda: bool) -> None:
        self.use_cuda = use_cuda
        self.started: float | None = None

    def _sync(self) -> None:
        if self.use_cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self.started = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self.started if self.started is not None else 0.0


def _timed_tokens(
    examples: Sequence[Example], batch_size: int, total_steps: int, warmup_steps: int, shuffle: bool
) -> int:
    lengths = [len(e.input_ids) for e in examples]
    steps_per_epoch = -(-len(lengths) // batch_size)
    if shuffle:
        return round(sum(lengths) / steps_per_epoch * (total_steps - warmup_steps))
    batches = [sum(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)]
    return sum(batches[step % steps_per_epoch] for step in range(warmup_steps, total_steps))


def peak_memory_bytes(use_cuda: bool) -> int:
    """CUDA max_memory_allocated, or on CPU the process's peak resident set size."""
    if use_cuda:
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
