"""Folding a LoRA adapter into its base model: a full model `AutoModelForCausalLM` can load.

from worker.training import merge_model
merge_model("models/my_lora_model", "models/my_merged_model")          # base from the adapter
merge_model("Qwen/Qwen2.5-0.5B", "models/my_lora_model", "models/out")  # the seed's call
python -m worker.training.merge ADAPTER_DIR OUT_DIR [--base MODEL]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from worker.training.base_name import recorded_base
from worker.training.staged_dir import staged_dir


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: str | int = "4GB",
    safe_serialization: bool = True,
    save_tokenizer: bool = True,
) -> tuple[Path, PreTrainedModel, Any]:
    """Merge the adapter at `adapter_dir` into its base model and save the result to `output_dir`.

    The base model defaults to the one the adapter was trained on; the merged model is written in
    the base model's own dtype unless `dtype` is given. Writing is atomic, and `output_dir` is
    replaced only when it is empty or an earlier output of this service (`shared.outputs`).
    Returns the folder, the merged model and the tokenizer.
    """
    adapter_dir, dest = Path(adapter_dir), Path(output_dir)
    base = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter_dir}: the adapter does not name its base model; pass base_model")
    recorded = recorded_base(base)  # the hub id or an absolute path: found from any working directory
    adapter = str(adapter_dir.resolve())
    with staged_dir(dest, "merged_model", base_model=recorded, adapter=adapter) as staging:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        merged.config.name_or_path = recorded  # `_name_or_path`, where a transformers version saves it
        tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(base)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_src))
        merged.save_pretrained(str(staging), max_shard_size=max_shard_size, safe_serialization=safe_serialization)
        if save_tokenizer:
            tokenizer.save_pretrained(str(staging))
        (staging / "merge_summary.json").write_text(json.dumps({"base_model": recorded, "adapter": adapter}))
    return dest, merged, tokenizer


def merge_model(
    model_name: str | Path,
    lora_path: str | Path,
    model_output: str | Path | None = None,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    torch_dtype: str = "auto",
    save_tokenizer: bool = True,
    save_config: bool = True,
    safe_serialization: bool = True,
    max_shard_size: str | int = "4GB",
    push_to_hub: bool = False,
) -> Path | tuple[PreTrainedModel, Any]:
    """Merge an adapter into its base model. Two call forms:

    - ``merge_model(adapter_dir, output_dir, base_model=None, dtype=None)`` -> the output folder.
    - the seed's ``merge_model(model_name, lora_path, model_output, save_tokenizer=True,
      save_config=True, safe_serialization=True, max_shard_size="4GB", torch_dtype="auto")`` ->
      ``(merged_model, tokenizer)``, as the seed returned them. ``push_to_hub`` is refused: this
      service keeps models on its own volume (upload the folder with ``huggingface-cli upload``).
    """
    if push_to_hub:
        raise NotImplementedError("push_to_hub is not supported; upload the merged folder yourself")
    if model_output is None:  # (adapter_dir, output_dir)
        return merge_adapter(model_name, lora_path, base_model=base_model, dtype=dtype)[0]
    # save_config: the config is always saved with the model (save_pretrained writes it).
    _, merged, tokenizer = merge_adapter(
        lora_path,
        model_output,
        base_model=str(model_name),
        dtype=dtype or torch_dtype,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        save_tokenizer=save_tokenizer,
    )
    return merged, tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-server merge", description=merge_adapter.__doc__)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--base", default=None, help="base model (default: the adapter's own)")
    args = parser.parse_args(argv)
    print(merge_adapter(args.adapter_dir, args.output_dir, base_model=args.base)[0])


if __name__ == "__main__":
    main()
