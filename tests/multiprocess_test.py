"""Two local processes run one `jaxad.train` (issue 16, "multi-process").

Each process is its own JAX process with one CPU device, joined by
`jax.distributed.initialize` on localhost (CPU collectives: gloo), so the
job's mesh is data=2 over both processes: every batch is split across them
and gradients and BatchNorm statistics are all-reduced between them. Both
prepare the data through one shared cache (process 0 prepares, the other
waits and reads), take part in every checkpoint save and restore, and
process 0 alone writes the workdir's files.

Its eval.json (without "run") must be bit-identical to the same config run
by one process on two devices: the same mesh and the same SPMD program,
whose all-reduces add the same two partial sums (one addition, exact in
either order). After both processes are stopped mid-run (SIGTERM) and
relaunched, the resumed run's must be too, and so must a run relaunched on
an unreadable latest checkpoint (set aside, the step before restored).
(Against one process on ONE device the summation order of the batch
reductions changes, so only float32 rounding is shared; that comparison is
not made here.)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest

from jaxad import evaluate
from tests import train_test

REPO = str(train_test.REPO)
TIMEOUT_S = 150  # one run of both processes; ~45 s on 2 busy cores


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices: int, **extra: str) -> dict:
  """The environment of a `jaxad.train` process with `devices` CPU
  devices (conftest forces 8 in this process)."""
  out = dict(os.environ)
  out.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
    **extra,
  )
  return out


class MultiProcessTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.root = os.path.join(cls.tmp, "data")
    train_test.make_folders(cls.root)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)  # checkpoints are large
    super().tearDownClass()

  def args(self, workdir: str) -> list[str]:
    # train_test's tiny DDAD run: 2 epochs (8 ensemble + UDM-tail steps),
    # a checkpoint every 3 steps.
    c = "--config."
    return [
      sys.executable,
      "-m",
      "jaxad.train",
      "--config",
      "configs/ddad.py:smoke",
      f"{c}epochs=2",
      f"{c}data.format=folders",
      f"{c}data.root={self.root}",
      # 4 unlabeled: the UDM's 36 images take the NDM's 4 steps per epoch,
      # so there is no "udm_tail" phase to compile.
      f"{c}data.unlabeled_size=4",
      f"{c}data.anomaly_rate=0.5",
      f"{c}data.cache_dir={os.path.join(self.tmp, 'cache')}",
      f"{c}model.width=0.5",
      f"{c}train.batch_size=8",
      f"{c}train.log_every=2",
      f"{c}train.checkpoint_every=3",
      f"{c}eval.batch_size=8",
      f"{c}refine.enabled=false",
      # One vmapped program for the members (not unrolled): half the
      # compile time, which dominates these few steps.
      f"{c}train.member_strategy=vmap",
      "--workdir",
      workdir,
    ]

  def launch(self, workdir: str, processes: int, devices: int = 1) -> list:
    """Starts the run's processes; process i logs to W.<i>.log
    (appended: a relaunch adds to it)."""
    port = free_port()
    procs = []
    for i in range(processes):
      extra = {}
      if processes > 1:
        extra = dict(
          JAXAD_DISTRIBUTED="1",
          JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
          JAXAD_NUM_PROCESSES=str(processes),
          JAXAD_PROCESS_ID=str(i),
        )
      log = open(f"{workdir}.{i}.log", "a")
      self.addCleanup(log.close)
      procs.append(
        subprocess.Popen(
          self.args(workdir),
          cwd=REPO,
          env=env(devices, **extra),
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
    return procs

  def wait(self, workdir: str, procs: list) -> list[int]:
    """The exit statuses; every process is killed after TIMEOUT_S (a
    process whose peer died waits in a collective)."""
    deadline = time.monotonic() + TIMEOUT_S
    codes = []
    for p in procs:
      try:
        codes.append(p.wait(max(1, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        self.fail(f"{workdir}: timed out\n{self.logs(workdir, len(procs))}")
    return codes

  def logs(self, workdir: str, processes: int, tail: int = 3000) -> str:
    out = []
    for i in range(processes):
      with open(f"{workdir}.{i}.log") as f:
        out.append(f"--- process {i}:\n" + f.read()[-tail:])
    return "\n".join(out)

  def run_to_end(self, name: str, processes: int, devices: int = 1) -> dict:
    workdir = os.path.join(self.tmp, name)
    codes = self.wait(workdir, self.launch(workdir, processes, devices))
    self.assertEqual(codes, [0] * processes, self.logs(workdir, processes))
    return eval_json(workdir)

  def test_two_processes_match_one_and_resume_after_sigterm(self):
    two = self.run_to_end("two", processes=2)
    one = self.run_to_end("one", processes=1, devices=2)
    run = json.loads(read(self.tmp, "two", "eval.json"))["run"]
    self.assertEqual((run["num_processes"], run["num_devices"]), (2, 2))
    self.assertEqual(two, one)
    workdir = os.path.join(self.tmp, "two")
    # The shared cache was prepared once, by process 0.
    self.assertIn("Preparing data", read(f"{workdir}.0.log"))
    self.assertNotIn("Preparing data", read(f"{workdir}.1.log"))
    self.assertIn("Using cached data", read(f"{workdir}.1.log"))
    # Process 0 alone writes: each logged step's metrics once.
    steps = [
      json.loads(line)["step"]
      for line in read(workdir, "metrics.jsonl").splitlines()
    ]
    self.assertEqual(steps, [2, 4, 6, 8])

    # The latest checkpoint made unreadable: relaunched, both processes
    # find it so, process 0 sets it aside, and (after a barrier) both
    # resume from the step before and end as the first run did.
    checkpoints = os.path.join(workdir, "checkpoints")
    latest = max(int(s) for s in os.listdir(checkpoints) if s.isdigit())
    for folder, _, files in os.walk(os.path.join(checkpoints, str(latest))):
      for name in files:
        if name.startswith("manifest"):  # the array data's index
          os.remove(os.path.join(folder, name))
    self.assertEqual(self.run_to_end("two", processes=2), two)
    self.assertIn("moved it to", read(f"{workdir}.0.log"))
    moved = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    self.assertIn(str(latest), moved)

    # Both processes stopped (SIGTERM, as a scheduler would) while they
    # compile the first step: each finishes step 1 and saves it.
    workdir = os.path.join(self.tmp, "resumed")
    procs = self.launch(workdir, 2)
    deadline = time.monotonic() + TIMEOUT_S
    while not all(
      "Phase ensembles" in read(f"{workdir}.{i}.log") for i in (0, 1)
    ):
      self.assertLess(time.monotonic(), deadline, self.logs(workdir, 2))
      self.assertEqual([p.poll() for p in procs], [None, None])
      time.sleep(0.1)
    for p in procs:
      p.send_signal(signal.SIGTERM)
    codes = self.wait(workdir, procs)
    self.assertEqual(codes, [143, 143], self.logs(workdir, 2))
    for i in (0, 1):
      self.assertIn("SIGTERM at step 2;", read(f"{workdir}.{i}.log"))
    resumed = self.run_to_end("resumed", processes=2)
    for i in (0, 1):  # both restored the checkpoint both wrote
      self.assertIn("Restored checkpoint of step 2", read(f"{workdir}.{i}.log"))
    self.assertEqual(resumed, two)


def read(*parts: str) -> str:
  with open(os.path.join(*parts)) as f:
    return f.read()


def eval_json(workdir: str) -> dict:
  return evaluate.without_run(json.loads(read(workdir, "eval.json")))


if __name__ == "__main__":
  absltest.main()
