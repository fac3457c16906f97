"""Stopping training on a signal at a step boundary, with a checkpoint.

Ctrl-C (SIGINT) and SIGTERM (schedulers, preemptible VMs, `kill`) are
handled alike while the loop runs: the step in flight finishes, the loop
saves a checkpoint and raises `Stopped`, and `jaxad.train` exits with
128 + the signal's number, the shell's convention for a process ended by a
signal (130 for Ctrl-C, 143 for SIGTERM) after one line saying how to
resume. A second signal stops at once, without a checkpoint. kill -9
cannot be caught: the run resumes from its last periodic checkpoint.
"""

import signal
import threading

from absl import logging


class Stopped(KeyboardInterrupt):
  """Training stopped by signal `signum` (a KeyboardInterrupt, so that code
  that handles Ctrl-C handles SIGTERM alike)."""

  def __init__(self, signum: int):
    self.signum = int(signum)
    super().__init__(signal_name(self.signum))

  @property
  def exit_code(self) -> int:
    """128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + self.signum


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def exit_code(error: KeyboardInterrupt) -> int:
  """The exit status for a stopped run: `Stopped.exit_code`, or 130 for a
  KeyboardInterrupt raised otherwise (Ctrl-C outside the loop)."""
  return getattr(error, "exit_code", 128 + signal.SIGINT)


class StopOnSignal:
  """Context manager: SIGINT or SIGTERM sets `requested` (and `signum`)
  instead of ending the process; the loop checks it at each step boundary.
  A second signal raises `Stopped` at once.

  The handlers are installed only in the main thread (Python allows no
  other) and the previous ones are restored on exit, so that outside the
  loop (data loading, evaluation) the signals act as before.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __enter__(self):
    self.requested = False
    self.signum = None
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:
      raise Stopped(signum)
    self.requested, self.signum = True, signum
    logging.warning(
      "%s: stopping after the step in flight, with a checkpoint (send it "
      "again to stop at once, without one).",
      signal_name(signum),
    )

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}
