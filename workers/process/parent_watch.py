"""A group's child processes end with their launcher, however it ends (SIGKILL included).

The device process and the consumers call ``die_with_parent()`` first thing. On Linux it asks
the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill the calling process when the
thread that started it exits: a launcher killed with SIGKILL then takes its whole group with
it, as a container or pod would, instead of leaving consumers that keep taking jobs. Where
``prctl`` is not available, a daemon thread polls the parent pid instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
#: Fallback polling interval where prctl is missing (s).
_POLL_S = 1.0


def die_with_parent() -> None:
    """Arrange for this process to be killed when its parent (the launcher) goes away."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        def watch() -> None:
            while not threading.Event().wait(_POLL_S):
                if os.getppid() != parent:
                    os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os._exit(1)
