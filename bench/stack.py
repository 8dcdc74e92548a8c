"""The stack a benchmark or GPU check ran on, in one line: the GPU (or "no GPU"), CUDA, and the versions of
the packages that decide what the engine does.

    python -m bench.stack [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "liger-kernel", "flash-attn")


def versions() -> dict[str, str]:
    """Installed versions of `PACKAGES`; the optional ones (liger-kernel, flash-attn) only where present."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            if name in ("torch", "transformers", "peft", "trl"):
                found[name] = "missing"
    return found


def describe() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    else:
        device = "no GPU"
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CUDA none (a CPU build of torch)"
    packages = ", ".join(f"{name} {version}" for name, version in versions().items())
    return f"{device}; {cuda}; {packages}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stack", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the line here")
    args = parser.parse_args(argv)
    line = describe()
    print(f"stack: {line}", flush=True)
    if args.out is not None:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
