"""Two runs on one workdir: the second refuses at start, naming the PID
that holds W/.lock; a lock left by a dead process is taken over."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest

from jaxad import train, workdir_lock
from tests import train_test

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {
  **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  "JAX_PLATFORMS": "cpu",
}
# Holds W's lock like a run would, until its stdin closes.
HOLDER = (
  "import sys\n"
  "from jaxad import workdir_lock\n"
  "with workdir_lock.hold(sys.argv[1], 'jaxad.train'):\n"
  "  print('held', flush=True)\n"
  "  sys.stdin.read()\n"
)


def start_holder(workdir):
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLDER, workdir],
    cwd=REPO,
    env=ENV,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


class WorkdirLockTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    self.workdir = os.path.join(self.root, "w")

  def test_a_second_run_is_refused_naming_the_pid(self):
    holder = start_holder(self.workdir)
    self.addCleanup(holder.wait)
    self.addCleanup(holder.stdin.close)
    # In process: refused before any data or compute, nothing written.
    config = train_test.tiny_config(
      os.path.join(self.root, "no-data"), os.path.join(self.root, "cache")
    )
    with self.assertRaisesRegex(
      workdir_lock.WorkdirBusyError,
      rf"in use by PID {holder.pid} on host {socket.gethostname()} "
      r"\(jaxad.train, started ",
    ):
      train.run(config, self.workdir)
    self.assertEqual(sorted(os.listdir(self.workdir)), [".lock"])
    # On the command line: one line, no traceback, exit 75.
    out = subprocess.run(
      [
        sys.executable,
        "-m",
        "jaxad.train",
        "--config",
        "configs/ddad.py",
        "--workdir",
        self.workdir,
      ],
      cwd=REPO,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=300,
    )
    self.assertEqual(out.returncode, workdir_lock.EXIT_BUSY, out.stderr)
    self.assertEqual(train.EXIT_BUSY, 75)
    self.assertIn(f"in use by PID {holder.pid}", out.stderr)
    self.assertNotIn("Traceback", out.stderr)
    # Released when the holder ends: the lock is free and the file empty.
    holder.stdin.close()
    holder.wait(timeout=60)
    with workdir_lock.hold(self.workdir, "test"):
      pass
    self.assertEqual(
      pathlib.Path(workdir_lock.lock_path(self.workdir)).read_text(), ""
    )

  def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(self):
    holder = start_holder(self.workdir)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up: the PID stays
    holder.wait(timeout=60)
    holder.stdin.close()
    holder.stdout.close()
    path = workdir_lock.lock_path(self.workdir)
    self.assertEqual(
      json.loads(pathlib.Path(path).read_text())["pid"], holder.pid
    )
    with self.assertLogs("absl", "WARNING") as logs:
      with workdir_lock.hold(self.workdir, "jaxad.train"):
        record = json.loads(pathlib.Path(path).read_text())
    self.assertEqual(record["pid"], os.getpid())
    self.assertEqual(record["host"], socket.gethostname())
    self.assertLen(logs.output, 1)
    self.assertIn(f"stale lock {path} of PID {holder.pid}", logs.output[0])
    self.assertIn("which no longer runs", logs.output[0])

  def test_in_one_process_a_second_hold_is_refused_too(self):
    with workdir_lock.hold(self.workdir, "first"):
      with self.assertRaisesRegex(
        workdir_lock.WorkdirBusyError, rf"PID {os.getpid()} .*\(first,"
      ):
        with workdir_lock.hold(self.workdir, "second"):
          pass
    with workdir_lock.hold(self.workdir, "third"):  # released
      pass


if __name__ == "__main__":
  absltest.main()
