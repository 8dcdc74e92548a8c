"""The generation worker's loaded models: base models, and on each the adapters asked for lately.

Both are least-recently-used caches bounded by settings (LORA_GENERATION_MAX_BASE_MODELS,
LORA_GENERATION_MAX_ADAPTERS). Adapters live on their base as PEFT adapters (`load_adapter`, then
`set_adapter` per request; `disable_adapter()` serves the base alone), so switching between a base's
adapters costs nothing and a new adapter costs only its own small weights. An adapter is known by its
folder and the time its weights were written, so one retrained into the same folder is loaded afresh.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from worker.training.chat_template import DatasetTokenizationError, find_turn_end

log = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """The base model or adapter folder named by a request cannot be loaded."""


def generation_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(setting)


def _dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class LoadedBase:
    """A base model on the device, its tokenizer, what ends its turns, and the adapters loaded on it."""

    name: str
    model: PreTrainedModel | PeftModel
    tokenizer: Any
    stop_token_ids: frozenset[int]  # eos, and the chat template's end-of-turn token
    stop_texts: list[str]  # the end-of-turn marker, when it is not one token
    cache_arg: str  # the forward argument that takes the KV cache: `cache` (transformers >= 5.2x) or the old name
    adapters: OrderedDict[tuple[str, int], str] = field(default_factory=OrderedDict)  # (folder, mtime) -> name
    next_adapter: int = 0

    def use(self, adapter_name: str | None) -> contextlib.AbstractContextManager[Any]:
        """A context in which the model runs with `adapter_name` applied (None: the base alone)."""
        if not isinstance(self.model, PeftModel):
            return contextlib.nullcontext()
        if adapter_name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter_name)
        return contextlib.nullcontext()


def _stops(tokenizer: Any, model: PreTrainedModel) -> tuple[frozenset[int], list[str]]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    texts: list[str] = []
    try:
        marker = find_turn_end(tokenizer).marker
    except DatasetTokenizationError as exc:  # no chat template, or one with no turn end: eos alone stops
        log.info("no end-of-turn marker for %s: %s", getattr(tokenizer, "name_or_path", "?"), exc)
        return frozenset(ids), texts
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(marker_ids) == 1:
        ids.add(int(marker_ids[0]))
    else:
        texts.append(marker)
    return frozenset(ids), texts


class ModelCache:
    def __init__(self, *, max_bases: int, max_adapters: int, device: torch.device) -> None:
        self.max_bases, self.max_adapters, self.device = max_bases, max_adapters, device
        self.bases: OrderedDict[str, LoadedBase] = OrderedDict()
        self.base_loads = 0  # how many times a base model was read from disk (tests check reuse)
        self.adapter_loads = 0

    def get(self, base_name: str, adapter_path: str | None) -> tuple[LoadedBase, str | None]:
        """The loaded base and the name of the loaded adapter (None for the base alone), loading what is missing."""
        base = self._base(base_name)
        if adapter_path is None:
            return base, None
        return base, self._adapter(base, Path(adapter_path))

    def _base(self, name: str) -> LoadedBase:
        if name in self.bases:
            self.bases.move_to_end(name)
            return self.bases[name]
        while len(self.bases) >= self.max_bases:
            evicted = self.bases.popitem(last=False)[0]  # no reference kept: its memory is freed below
            log.info("unloading base model %s", evicted)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        log.info("loading base model %s on %s", name, self.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=_dtype(self.device))
        except OSError as exc:
            raise ModelNotFoundError(f"could not load base model {name!r}: {exc}") from exc
        model.to(self.device)  # type: ignore[arg-type]  # transformers types .to() for models oddly
        model.eval()
        self.base_loads += 1
        ids, texts = _stops(tokenizer, model)
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        loaded = LoadedBase(name, model, tokenizer, ids, texts, cache_arg)
        self.bases[name] = loaded
        return loaded

    def _adapter(self, base: LoadedBase, folder: Path) -> str:
        key = (str(folder), _written_at(folder))
        if key in base.adapters:
            base.adapters.move_to_end(key)
            return base.adapters[key]
        name = f"adapter{base.next_adapter}"
        base.next_adapter += 1
        log.info("loading adapter %s on %s", folder, base.name)
        try:
            with warnings.catch_warnings():
                # Our adapters ask PEFT to keep tied embeddings tied; a model without tied ones makes that a no-op.
                warnings.filterwarnings("ignore", message=".*ensure_weight_tying")
                if isinstance(base.model, PeftModel):
                    base.model.load_adapter(str(folder), adapter_name=name)
                    _tie_output_embeddings(base.model, name)
                else:
                    base.model = PeftModel.from_pretrained(base.model, str(folder), adapter_name=name)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"could not load adapter {folder}: {exc}") from exc
        base.model.eval()
        self.adapter_loads += 1
        base.adapters[key] = name
        # Evict after loading, so the model never holds no adapter at all (PEFT cannot delete its last one),
        # with the new one active, so PEFT has no active adapter to replace when it deletes the old one.
        base.model.set_adapter(name)
        while len(base.adapters) > self.max_adapters:
            _, old = base.adapters.popitem(last=False)
            base.model.delete_adapter(old)
        return name


def _tie_output_embeddings(model: PeftModel, name: str) -> None:
    """Give a second (third, ...) adapter its own output embedding, tied to its input embedding.

    An adapter trained with `embed_tokens` in full on a model with tied embeddings (the seed's default)
    has PEFT tie its `lm_head` copy to its `embed_tokens` copy. PEFT 0.21 does that when the adapter is
    the model's first, but `load_adapter` leaves the tied `lm_head` wrapper without the new adapter, so
    that adapter would answer through the base model's output embedding. Any wrapper whose copy for an
    earlier adapter is that adapter's input embedding gets the same for the new one.
    """
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, ModulesToSaveWrapper) or name not in embeddings.modules_to_save:
        return
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper) or module is embeddings or name in module.modules_to_save:
            continue
        tied = any(
            other in embeddings.modules_to_save
            and getattr(copy, "weight", None) is embeddings.modules_to_save[other].weight
            for other, copy in module.modules_to_save.items()
        )
        if tied:
            module.update(name, tied_module=embeddings.modules_to_save[name])


def _written_at(folder: Path) -> int:
    """When the adapter's weights were last written (0 when there are none: loading will say why)."""
    stamps = [p.stat().st_mtime_ns for p in folder.glob("adapter_model.*") if p.is_file()]
    return max(stamps, default=0)


@contextlib.contextmanager
def inference() -> Iterator[None]:
    with torch.inference_mode():
        yield
