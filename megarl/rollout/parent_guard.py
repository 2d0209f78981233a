"""Run a command that is stopped when the process that started it dies.

    python -m megarl.rollout.parent_guard PARENT_PID CMD [ARGS ...]

megarl starts servers and the router this way: if trainer rank 0 is killed outright (OOM
killer, `scancel --signal=KILL`, a node failure of the launcher), its servers get SIGTERM from
the kernel instead of holding GPUs after the job is gone. The guard sets Linux's
PR_SET_PDEATHSIG and then replaces itself with the command (same process id); elsewhere it only
replaces itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m megarl.rollout.parent_guard PARENT_PID CMD [ARGS ...]",
              file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[1:]
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: no guard
    # The parent may have died while this interpreter was starting, before the guard was set:
    # then there is nobody to serve.
    if os.getppid() != parent:
        return 1
    os.execvp(command[0], command)
    return 127  # not reached: execvp raises on failure


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
