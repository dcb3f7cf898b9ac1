"""One trainer per output folder: an advisory lock that node 0's launcher holds while the run lasts.

Two runs writing one folder interleave checkpoints and exports. The lock is `flock` on
`<output>/.finetune.lock`, which the kernel (or the NFS server) releases when its holder dies, so a
killed trainer never leaves a stale lock. A pod that replaces a terminating one waits a little for it
to go (FINETUNE_LOCK_WAIT_SECONDS, default 60), then fails as retryable (exit 75). On a file system
without locks (some FUSE and object-store mounts) the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.contracts import TransientError
from finetune.spec import SpecError

log = logging.getLogger(__name__)
LOCK_FILE = ".finetune.lock"
LOCK_WAIT_ENV = "FINETUNE_LOCK_WAIT_SECONDS"
LOCK_WAIT_SECONDS = 60.0
POLL_SECONDS = 0.5
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another trainer"
    except OSError:
        return "another trainer"


@contextmanager
def output_lock(output: Path, wait: float | None = None) -> Iterator[None]:
    """Hold the folder's lock for the block; TransientError when another trainer keeps it past `wait`."""
    wait = float(os.environ.get(LOCK_WAIT_ENV) or LOCK_WAIT_SECONDS) if wait is None else wait
    path = output / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only volume, or something else in the lock file's place
        raise SpecError(f"--output {output}: cannot write {path}: {err.strerror}; give a writable folder "
                        "(is the volume mounted read-only?)") from None
    try:
        if acquire(fd, path, wait):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def acquire(fd: int, path: Path, wait: float) -> bool:
    """True once locked; False when the file system has no locks (the run goes on unguarded)."""
    deadline = time.monotonic() + wait
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in UNSUPPORTED:
                log.warning("cannot lock %s (%s): nothing stops a second trainer writing this folder",
                            path.parent, err.strerror)
                return False
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            raise TransientError(f"--output {path.parent} is in use by {holder(path)}; two trainers must not "
                                 "write one folder (a later attempt may succeed once that one ends)")
        if not announced:
            log.warning("--output %s is in use by %s; waiting up to %.0f s", path.parent, holder(path), wait)
            announced = True
        time.sleep(POLL_SECONDS)
