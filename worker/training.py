"""Fine-tuning one LoRA adapter: load the base model, tokenize, run the loop, save atomically.

The library entry point (no server, no Redis):

    from worker.training import train_model, TrainConfig
    train_model(TrainConfig(model_name="Qwen/Qwen2.5-0.5B", epochs=1), "data.jsonl", "out/my_adapter")
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from shared.config import EngineName, TrainConfig
from shared.dataset import check_record
from shared.jobs import Progress
from worker.data import read_records, tokenize_dataset
from worker.engine import engine_attn_implementation
from worker.evaluation import eval_loss
from worker.example import Example
from worker.loop import StepInfo, train_loop
from worker.merge import merge_model
from worker.staged_dir import staged_dir
from worker.wandb_log import WandbRun

__all__ = ["TrainConfig", "TrainResult", "load_base_model", "merge_model", "train_model"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]
EventCallback = Callable[[str, str, dict[str, Any]], None]


@dataclass
class TrainResult:
    output_dir: Path | None  # None when the run was stopped before saving
    stopped: bool
    steps: int
    total_steps: int
    final_loss: float | None
    num_examples: int
    skipped_examples: int
    total_tokens: int
    elapsed_s: float
    tokens_per_second: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (epoch, loss)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir) if self.output_dir else None
        return out


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU, unless the config says otherwise."""
    named = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if config.model_load_torch_dtype != "auto":
        return named[config.model_load_torch_dtype]
    if config.train_arg_bf16:
        return torch.bfloat16
    if config.train_arg_fp16:
        return torch.float16
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported() and config.train_arg_bf16 is not False:
        return torch.bfloat16
    return torch.float16 if config.train_arg_fp16 is not False else torch.float32


def fast_engine_unsupported(model_config: Any) -> str | None:
    """Why the packed, chunked-loss engine would not train this model's own loss, if it would not.

    It applies the LM head directly and keeps every packed sequence whole, so logit soft-capping
    or scaling and sliding-window attention layers need the reference engine.
    """
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(model_config, name, None):
            return f"{name}={getattr(model_config, name)}"
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(model_config, name, None)
        if value not in (None, 1, 1.0):
            return f"{name}={value}"
    layer_types = getattr(model_config, "layer_types", None) or []
    if getattr(model_config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        return "sliding-window attention layers"
    return None


def load_base_model(
    config: TrainConfig, device: torch.device, on_event: EventCallback | None = None
) -> tuple[PreTrainedModel, Any, EngineName]:
    """The base model and tokenizer, with the attention implementation the hardware allows, and
    the engine that will train it (the config's, unless the model needs the reference one)."""
    try:
        model_config = AutoConfig.from_pretrained(config.model_name)
    except OSError as exc:  # not a local directory and not in the hub cache (or the hub is unreachable)
        raise OSError(f"could not load model {config.model_name!r}: {exc}") from exc
    engine: EngineName = config.engine
    reason = fast_engine_unsupported(model_config) if engine == "fast" else None
    if reason is not None:
        engine = "reference"
        if on_event is not None:
            on_event("warning", f"{reason}: training with the reference engine", {"engine": engine})
    attn, warning = engine_attn_implementation(engine, config.attn_implementation, device)
    if warning and on_event is not None:
        on_event("warning", warning, {"requested": config.attn_implementation, "using": attn})
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model_name)
        model = AutoModelForCausalLM.from_pretrained(
            config.model_name, dtype=resolve_dtype(config, device), attn_implementation=attn
        )
    except OSError as exc:  # not a local directory and not in the hub cache (or the hub is unreachable)
        raise OSError(f"could not load model {config.model_name!r}: {exc}") from exc
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() for models oddly
    return model, tokenizer, engine


def check_modules_to_save(model: torch.nn.Module, names: Sequence[str]) -> None:
    """A name in lora_modules_to_save that matches no module is an error, not a silent no-op."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [n for n in names if n not in leaves and not any(m.endswith(n) for m, _ in model.named_modules())]
    if missing:
        raise ValueError(
            f"lora_modules_to_save: no module named {', '.join(map(repr, missing))} in {type(model).__name__}"
        )


def apply_lora(model: PreTrainedModel, config: TrainConfig, lora_path: Path | None) -> PeftModel:
    check_modules_to_save(model, config.lora_modules_to_save)
    if lora_path is not None:
        return PeftModel.from_pretrained(model, str(lora_path), is_trainable=True)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        modules_to_save=list(config.lora_modules_to_save) or None,
        # Tied input/output embeddings must stay tied when both are trained in full, or the saved adapter
        # (and a merged model, which reloads them tied) would disagree with what was trained.
        ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False)),
        task_type="CAUSAL_LM",
    )
    peft_model: PeftModel = get_peft_model(model, lora)
    return peft_model


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep every trained parameter in fp32 (the frozen base may be bf16/fp16).

    PEFT keeps LoRA weights in fp32 but copies `modules_to_save` (the seed's lm_head and
    embed_tokens) in the base dtype; AdamW on bf16 weights loses small updates, on fp16 it overflows.
    """
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def _records(dataset: str | Path | Iterable[dict[str, Any]]) -> Iterable[list[dict[str, str]]]:
    if isinstance(dataset, str | Path):
        yield from read_records(Path(dataset))
        return
    for i, record in enumerate(dataset):
        messages, reason = check_record(record)
        if reason is not None:
            raise ValueError(f"dataset record {i + 1}: {reason}")
        assert messages is not None
        yield messages


class _StoppedEarly(Exception):
    """should_stop() said so before training began (while loading or tokenizing)."""


def _watch(
    records: Iterable[list[dict[str, str]]], should_stop: Callable[[], bool] | None
) -> Iterator[list[dict[str, str]]]:
    """Pass records through, checking for a stop request every 256 (tokenizing 100k records takes a while)."""
    for i, record in enumerate(records):
        if should_stop is not None and i % 256 == 0 and should_stop():
            raise _StoppedEarly
        yield record


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise _StoppedEarly


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _save(model: PeftModel, tokenizer: Any, config: TrainConfig, dest: Path, summary: dict[str, Any]) -> None:
    """Write into a sibling temp folder, then swap it into place: never a half-written adapter."""
    with staged_dir(dest) as staging:
        model.save_pretrained(str(staging))
        if config.tokenizer_padding_side is not None:
            tokenizer.padding_side = config.tokenizer_padding_side
        tokenizer.save_pretrained(str(staging))
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=2))


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one, never all), reproducibly."""
    if len(examples) < 2:
        raise ValueError("validation_split needs at least 2 usable examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n_eval]]


class _Checkpoints:
    """Adapter checkpoints at each epoch end under `root/step-NNNNNN/`, keeping the newest `keep`."""

    def __init__(self, root: Path | None, keep: int) -> None:
        self.root, self.keep = root, keep
        self.saved: list[dict[str, Any]] = []

    def save(self, model: PeftModel, *, step: int, epoch: int, loss: float | None, eval_loss: float | None) -> None:
        if self.root is None or self.keep == 0:
            return
        meta = {"step": step, "epoch": epoch, "loss": loss, "eval_loss": eval_loss, "created_at": time.time()}
        dest = self.root / f"step-{step:06d}"
        staging = self.root / f".step-{step:06d}.{uuid.uuid4().hex[:8]}.tmp"
        model.save_pretrained(str(staging))
        (staging / "checkpoint.json").write_text(json.dumps(meta))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
        self.saved.append({**meta, "path": str(dest)})
        while len(self.saved) > self.keep:
            shutil.rmtree(self.saved.pop(0)["path"], ignore_errors=True)


def train_model(
    config: TrainConfig | dict[str, Any] | None = None,
    dataset: str | Path | Iterable[dict[str, Any]] = "",
    output_dir: str | Path | None = None,
    *,
    lora_path: str | Path | None = None,
    validation: str | Path | Iterable[dict[str, Any]] | None = None,
    checkpoint_dir: str | Path | None = None,
    run_name: str | None = None,
    on_progress: ProgressCallback | None = None,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter in this process and save it under `output_dir`.

    `dataset` (and `validation`) is a JSON Lines path of `{"messages": [...]}` records or an
    iterable of such records. `output_dir` defaults to `config.model_save_path`, else
    `./lora_model`. `on_progress` is called on every step; `should_stop` is polled every step (the
    run then ends without saving). Checkpoints go to `checkpoint_dir` at each epoch end.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config or {})
    dest = Path(output_dir or cfg.model_save_path or "lora_model")
    emit: EventCallback = on_event or (lambda etype, message, data: log.info("%s: %s", etype, message))
    adapter = Path(lora_path) if lora_path is not None else (Path(cfg.lora_path) if cfg.lora_path else None)
    _seed_everything(cfg.seed)
    device = pick_device()
    start = time.monotonic()

    model, tokenizer, engine = load_base_model(cfg, device, emit)

    def tokenize(source: str | Path | Iterable[dict[str, Any]]) -> tuple[list[Example], int]:
        examples, skipped = tokenize_dataset(
            tokenizer,
            _watch(_records(source), should_stop),
            max_length=cfg.max_length,
            response_template=cfg.response_template,
        )
        if skipped:
            message = f"{skipped} examples had no assistant token left after truncation and were skipped"
            emit("warning", message, {"skipped": skipped})
        return examples, skipped

    try:
        _check_stop(should_stop)  # a cancel that arrived while the model loaded
        examples, skipped = tokenize(dataset)
        held_out = tokenize(validation)[0] if validation is not None else []
    except _StoppedEarly:
        elapsed = time.monotonic() - start
        return TrainResult(None, True, 0, 0, None, 0, 0, 0, elapsed, 0.0)
    if cfg.validation_split and not held_out:
        examples, held_out = split_validation(examples, cfg.validation_split, cfg.seed)
    if not examples:
        raise ValueError("no example has an assistant token to train on (check max_length and the dataset)")
    peft_model = apply_lora(model, cfg, adapter)
    upcast_trainable(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    emit(
        "info",
        f"training {trainable:,} of {total:,} parameters on {len(examples)} examples ({device.type})",
        {"trainable_params": trainable, "total_params": total, "examples": len(examples), "device": device.type,
         "validation_examples": len(held_out)},
    )  # fmt: skip
    wandb = WandbRun(run_name or dest.name, cfg.model_dump(), emit)
    checkpoints = _Checkpoints(Path(checkpoint_dir) if checkpoint_dir else None, cfg.keep_checkpoints)
    eval_losses: list[tuple[int, float]] = []
    last_step_at = time.monotonic()
    last: dict[str, Any] = {"step": 0, "loss": None}

    def step_hook(info: StepInfo) -> None:
        nonlocal last_step_at
        now = time.monotonic()
        step_seconds, last_step_at = now - last_step_at, now
        progress = Progress(
            step_seconds=step_seconds,
            current_step=info.step,
            total_steps=info.total_steps,
            current_epoch=info.epoch,
            total_epochs=info.epochs,
            loss=info.loss if info.loss is not None else last["loss"],  # the latest read, between logging steps
            learning_rate=info.learning_rate,
            grad_norm=info.grad_norm,
            tokens_per_second=info.tokens_per_second,
            eta_seconds=info.eta_seconds,
        )
        last["step"] = info.step
        if on_progress is not None:
            on_progress(progress)
        if info.loss is not None:
            last["loss"] = info.loss
            data = {"step": info.step, "epoch": info.epoch, "loss": info.loss, "learning_rate": info.learning_rate,
                    "grad_norm": info.grad_norm, "tokens_per_second": info.tokens_per_second,
                    "step_seconds": step_seconds}  # fmt: skip
            emit("metrics", f"step {info.step}/{info.total_steps} loss {info.loss:.4f}", data)
            wandb.log({"train/loss": info.loss, "train/learning_rate": info.learning_rate,
                       "train/grad_norm": info.grad_norm, "train/tokens_per_second": info.tokens_per_second},
                      step=info.step)  # fmt: skip

    def epoch_hook(epoch: int, loss: float | None) -> None:
        held = eval_loss(peft_model, held_out, batch_size=cfg.batch_size, device=device) if held_out else None
        data: dict[str, Any] = {"epoch": epoch, "step": last["step"], "loss": loss}
        message = f"epoch {epoch}/{cfg.epochs} done"
        if held is not None:
            eval_losses.append((epoch, held))
            data["eval_loss"] = held
            message += f", eval loss {held:.4f}"
            wandb.log({"eval/loss": held}, step=int(last["step"] or 0))
        emit("epoch", message, data)
        checkpoints.save(peft_model, step=int(last["step"] or 0), epoch=epoch, loss=loss, eval_loss=held)

    try:
        loop = train_loop(
            peft_model,
            examples,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            device=device,
            seed=cfg.seed,
            engine=engine,
            # Reading the loss back is a host sync: on a GPU, only every few steps.
            log_every=cfg.log_every or (10 if device.type == "cuda" else 1),
            on_step=step_hook,
            on_epoch_end=epoch_hook,
            should_stop=should_stop,
        )
    except BaseException:
        wandb.finish()
        raise
    elapsed = time.monotonic() - start
    result = TrainResult(
        output_dir=None,
        stopped=loop.stopped,
        steps=loop.steps_done,
        total_steps=cfg.epochs * math.ceil(len(examples) / cfg.batch_size),
        final_loss=loop.final_loss,
        num_examples=len(examples),
        skipped_examples=skipped,
        total_tokens=loop.total_tokens,
        elapsed_s=elapsed,
        tokens_per_second=loop.total_tokens / loop.elapsed_s if loop.elapsed_s > 0 else 0.0,
        losses=list(loop.logged_losses),
        eval_losses=eval_losses,
        checkpoints=checkpoints.saved,
    )
    wandb.finish({"final_loss": loop.final_loss, "stopped": loop.stopped})
    if loop.stopped:
        return result
    result.output_dir = dest
    summary = {**result.summary(), "config": cfg.model_dump(), "output_dir": str(dest)}
    _save(peft_model, tokenizer, cfg, dest, summary)
    return result
