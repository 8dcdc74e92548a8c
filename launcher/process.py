"""Child processes that cannot outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def own_group_dies_with_parent() -> None:
    """`preexec_fn` for Popen: a process group of its own (so its whole tree can be signalled),
    and, on Linux, SIGKILL when the parent dies, even if the parent is killed with SIGKILL."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
