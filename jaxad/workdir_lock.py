"""One run per workdir: an exclusive lock on W/.lock that names its holder.

Two runs writing one workdir corrupt each other's checkpoints (orbax
renames step folders under the other's feet) and leave temporary folders.
`jaxad.train` and `jaxad.evaluate` hold an advisory `flock` on W/.lock for
as long as they write W: the kernel releases it when the process ends, even
by kill -9 or a crash, so a lock can never outlive its run. The file also
records the holder's PID, host and start time, for the message a second run
gets, and is emptied on a clean exit: a non-empty file whose lock is free
was left by a run that died, which the next run takes over with a warning.
A workdir in a bucket (gs://) cannot be locked: a warning says so.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
from absl import logging

from jaxad import storage

LOCK_FILE = ".lock"
# The exit status of jaxad.train / jaxad.evaluate refused by a busy
# workdir: sysexits.h's EX_TEMPFAIL ("try again later").
EXIT_BUSY = 75


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


def lock_path(workdir: str) -> str:
  """W/.lock; W/.lock.<i> for process i of a multi-process run, so that
  the processes of one run (which share W) do not lock each other out."""
  if jax.process_count() > 1:
    return os.path.join(workdir, f"{LOCK_FILE}.{jax.process_index()}")
  return os.path.join(workdir, LOCK_FILE)


def _read(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", "replace").strip()
  if not text:
    return {}
  try:
    holder = json.loads(text)
  except ValueError:  # written by something else: still worth showing
    return {"raw": text[:200]}
  return holder if isinstance(holder, dict) else {"raw": text[:200]}


def _alive(pid) -> bool | None:
  """Whether `pid` runs on this host (None: unknown, e.g. no permission)."""
  if not isinstance(pid, int) or pid <= 0:
    return None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def describe(holder: dict) -> str:
  """'PID 123 on host h (jaxad.train, started 2025-01-01 10:00:00)'."""
  if not holder:
    return "another process (it has not written its PID yet)"
  if "raw" in holder:
    return f"another process ({holder['raw']!r})"
  text = f"PID {holder.get('pid')} on host {holder.get('host')}"
  extra = [str(holder["command"])] if holder.get("command") else []
  if holder.get("started"):
    extra.append(f"started {holder['started']}")
  return text + (f" ({', '.join(extra)})" if extra else "")


@contextlib.contextmanager
def hold(workdir: str, command: str) -> Iterator[None]:
  """Holds W's lock for the duration of the block (creates W).

  Args:
    workdir: the run directory.
    command: what holds it (e.g. "jaxad.train"), shown to a second run.

  Raises:
    WorkdirBusyError: another live process holds the lock; the message
      names its PID, host and command.
  """
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  if storage.is_remote(workdir):
    # A bucket has no flock; its conditional writes could emulate one, but
    # a lock that a dead run leaves behind would need a timeout to break.
    logging.warning(
      "%s is not a local folder: no lock guards it, so a second run on it "
      "would not be detected (run one job per workdir)",
      workdir,
    )
    yield
    return
  path = lock_path(workdir)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  locked = False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      raise WorkdirBusyError(
        f"{workdir} is in use by {describe(_read(fd))}: wait for it to end "
        "or stop it, or use another --workdir"
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      # e.g. a FUSE bucket mount: run, but say what is not guarded.
      logging.warning(
        "%s: this filesystem cannot lock files (%s); a second run on %s "
        "would not be detected",
        path,
        e.strerror,
        workdir,
      )
    previous = _read(fd)
    if previous:
      _warn_stale(path, previous)
    _write(fd, command)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # a clean exit: nothing stale left behind
  finally:
    if locked:
      fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _warn_stale(path: str, previous: dict) -> None:
  same_host = previous.get("host") == socket.gethostname()
  alive = _alive(previous.get("pid")) if same_host else None
  why = (
    "which no longer runs"
    if alive is False
    else "which no longer holds it (ended without cleaning up)"
  )
  logging.warning(
    "Took over the stale lock %s of %s, %s", path, describe(previous), why
  )


def _write(fd: int, command: str) -> None:
  record = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "command": command,
    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(record) + "\n").encode())
  os.fsync(fd)
