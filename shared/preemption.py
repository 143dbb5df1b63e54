"""Called first by each training script, before its heavy imports, so that a SIGTERM (preemption) ends the run from
the first second. Until the loop installs shared.checkpoint.GracefulStop, SIGTERM keeps Python's default and ends the
process at once (what it wrote is renamed into place when complete). Standard library only: importing it costs nothing."""

import ctypes
import os
import signal
from pathlib import Path

_forked_by = None  # the pid of the process that forks, noted just before each fork


def end_with_the_launcher():
    """A one-process `accelerate launch` runs the script as a child and does not pass SIGTERM on: the kernel is asked
    to send it when that launcher dies (torchrun and the multi-process launcher forward it; a script started from a
    shell should outlive it, as under nohup). Forked DataLoader workers get SIGKILL when the script dies: they hold no
    results, and one blocked sending a batch to its dead parent would otherwise live on."""
    os.register_at_fork(before=_note_the_forking_process, after_in_child=lambda: _die_with(_forked_by, signal.SIGKILL))
    launcher = os.getppid()
    try:
        command = Path(f"/proc/{launcher}/cmdline").read_bytes().split(b"\0")
    except OSError:
        command = []
    names = [os.path.basename(part) for part in command[:3]]
    launched = b"accelerate.commands.launch" in command or (b"accelerate" in names and b"launch" in command)
    if "WORLD_SIZE" not in os.environ and launched:
        _die_with(launcher, signal.SIGTERM)


def _note_the_forking_process():
    global _forked_by
    _forked_by = os.getpid()


def _die_with(parent: int, signum: int):
    ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG: signal this process when its parent dies
    if os.getppid() != parent:  # it died before the request took hold, so the signal will never come
        os.kill(os.getpid(), signum)
