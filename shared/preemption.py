"""Called first by each training script, before its heavy imports: a SIGTERM (preemption) to whatever the user
started must end the run from the first second, also during the imports, the data scan and the cache decoding.
Until the training loop installs shared.checkpoint.GracefulStop (which saves a checkpoint, then exits), SIGTERM
keeps Python's default, ending the process at once; what it writes before then is renamed into place when
complete, so nothing is left half written. Only the standard library here: importing this must cost nothing."""

import ctypes
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1
_forked_by = None  # the pid of the process that forks, noted just before each fork


def end_with_the_launcher():
    """Linux asks the kernel to signal a process when its parent dies. A single-process `accelerate launch` runs
    the script as a child and does not pass SIGTERM on: killed, it would leave the script orphaned, training to
    the end, so the script gets SIGTERM when that launcher dies. Other parents are left alone: torchrun and the
    multi-process launcher forward SIGTERM themselves, and a script started from a shell should outlive it (nohup).
    Forked DataLoader workers (cache decoding, batches) get SIGKILL when the script dies: they hold no results,
    and otherwise one blocked sending a batch to its dead parent would live on."""
    os.register_at_fork(before=_note_the_forking_process, after_in_child=_die_with_the_forking_process)
    launcher = os.getppid()
    if "WORLD_SIZE" not in os.environ and _runs_accelerate_launch(launcher):
        _signal_when_parent_dies(launcher, signal.SIGTERM)


def _note_the_forking_process():
    global _forked_by
    _forked_by = os.getpid()


def _die_with_the_forking_process():
    _signal_when_parent_dies(_forked_by, signal.SIGKILL)


def _signal_when_parent_dies(parent: int, signum: int):
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # it died before the request took hold, so the signal will never come
        os.kill(os.getpid(), signum)


def _runs_accelerate_launch(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    names = [os.path.basename(part) for part in command[:3]]
    return b"accelerate.commands.launch" in command or (b"accelerate" in names and b"launch" in command)
