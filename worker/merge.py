"""Folding a LoRA adapter into its base model: a full model `AutoModelForCausalLM` can load.

from worker.training import merge_model
merge_model("models/my_lora_model", "models/my_merged_model")
python -m worker.merge ADAPTER_DIR OUT_DIR [--base MODEL]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.staged_dir import staged_dir


def merge_model(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Merge the adapter at `adapter_dir` into its base model and save the result to `output_dir`.

    The base model defaults to the one the adapter was trained on. The merged model is written
    in the base model's own dtype unless `dtype` is given; writing is atomic (temp dir, rename).
    """
    adapter_dir, dest = Path(adapter_dir), Path(output_dir)
    base = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter_dir}: the adapter does not name its base model; pass base_model")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_src))
    with staged_dir(dest) as staging:
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / "merge_summary.json").write_text(json.dumps({"base_model": base, "adapter": str(adapter_dir)}))
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-server merge", description=merge_model.__doc__)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--base", default=None, help="base model (default: the adapter's own)")
    args = parser.parse_args(argv)
    print(merge_model(args.adapter_dir, args.output_dir, base_model=args.base))


if __name__ == "__main__":
    main()
