"""torch.compile's caches go to the volume unless the operator chose a place; both caches are forced on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared.volume import Volume
from worker.jobs import compile_cache

ROOT = Path(__file__).resolve().parents[3]


def test_the_caches_go_to_the_volume(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    where = compile_cache.configure(Volume(tmp_path), environ)
    assert where == tmp_path / ".cache" / "torch-compile" and where.is_dir()
    assert environ == {
        "TORCHINDUCTOR_CACHE_DIR": str(where),
        "TRITON_CACHE_DIR": str(where / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


def test_the_operators_choice_is_kept(tmp_path: Path) -> None:
    environ = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    assert compile_cache.configure(Volume(tmp_path / "volume"), environ) == tmp_path / "mine"
    assert environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine" / "triton")
    assert environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"
    assert not (tmp_path / "volume").exists()


def test_torch_imported_afterwards_reads_that_place(tmp_path: Path) -> None:
    """What the worker child does: configure first, then import torch; torch's caches are then on the volume."""
    code = (
        "import sys; from pathlib import Path; from shared.volume import Volume; from worker.jobs import compile_cache;"
        "compile_cache.configure(Volume(Path(sys.argv[1])));"
        "from torch._inductor import config as i; from torch._functorch import config as f;"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir;"
        "print(cache_dir(), triton_cache_dir(0), i.fx_graph_cache, f.enable_autograd_cache)"
    )
    env = {k: v for k, v in os.environ.items() if "CACHE" not in k or not k.startswith(("TORCH", "TRITON"))}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)  # fmt: skip
    where = tmp_path / ".cache" / "torch-compile"
    assert out.stdout.split() == [str(where), str(where / "triton"), "True", "True"]
