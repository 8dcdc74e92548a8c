"""torch.compile's on-disk caches on the shared volume, set up before torch is imported in a worker child.

Inductor keys its FX graph cache and AOTAutograd cache on the graph, the inputs' shapes, the torch
version and the device, so hosts with the same stack reuse each other's compiled graphs and Triton
kernels; a new worker then compiles in seconds what the first one took minutes for. torch reads these
variables when its config modules are imported, hence before the first job imports torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shared.volume import Volume

log = logging.getLogger(__name__)

INDUCTOR_CACHE_DIR = "TORCHINDUCTOR_CACHE_DIR"
TRITON_CACHE_DIR = "TRITON_CACHE_DIR"
# torch >= 2.5 has both caches on by default; these force them on unless the operator set them ("0": off).
FORCE_ON = ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


def configure(volume: Volume, environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Point torch's compile caches at the volume unless the operator already chose a place; the
    inductor cache folder in use."""
    inductor = environ.get(INDUCTOR_CACHE_DIR) or str(volume.compile_cache)
    environ.setdefault(INDUCTOR_CACHE_DIR, inductor)
    environ.setdefault(TRITON_CACHE_DIR, str(Path(inductor) / "triton"))
    for name in FORCE_ON:
        environ.setdefault(name, "1")
    try:
        Path(inductor).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only volume: inductor then fails over to compiling without a cache
        log.warning("compile cache %s is not writable: %s", inductor, exc)
    return Path(inductor)
