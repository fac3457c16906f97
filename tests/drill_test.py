"""Preemption drill: every `:smoke` config, trained on the command line,
stopped by kill -9 and SIGTERM at seeded random steps and resumed each
time, ends with the same eval.json as an uninterrupted run.

Each config runs `python -m jaxad.train` as a user would (one CPU device),
with progress lines every step (`train.log_every=1`, which changes no
result) to time the kill -9, and a checkpoint every 2 steps so that a
killed run resumes from a mid-phase checkpoint. SIGTERM is sent by the run
itself at its step (tests/drill_driver.py: jaxad.train's main with a step
callback), as a reader of the log would be too late for 30 ms steps; the
run must then exit 143 after saving that step, without a traceback. The
run after a kill -9 takes over the killed run's workdir lock. The
uninterrupted reference runs beside the drilled runs (2 processes)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl.testing import absltest, parameterized

from jaxad import evaluate
from tests import conformance_test

REPO = conformance_test.REPO
SEED = 15
# Interruptions per config, in this order; the first is a kill -9, timed
# from the progress lines (which give the number of steps the later ones
# are drawn from). The issue asks for three; the configs whose runs take
# over a minute on a loaded 2-core CPU (ddad, multiad, d24fad: each
# interruption costs a process start and a resume) get two, one of each
# kind, so that the drill stays near 3 minutes there.
THREE = (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)
TWO = (signal.SIGKILL, signal.SIGTERM)
KINDS = {"ppad": THREE, "ddad": TWO, "multiad": TWO, "d24fad": TWO}
# Fewer steps for the drill (the same for the reference run).
OVERRIDES = {
  "ddad": ["--config.refine.batch_size=32"],
  "d24fad": ["--config.data.max_source_images=32"],
}
STEP_LINE = re.compile(r"\] step (\d+)/(\d+) ")
TIMEOUT_S = 600


class Run:
  """One run of `jaxad.train` on `workdir`, its merged output read line by
  line; see `__call__`."""

  def __init__(self, name, workdir, cache):
    self.flags = [
      "--config",
      f"configs/{name}.py:smoke",
      "--workdir",
      workdir,
      f"--config.data.cache_dir={cache}",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=2",
      *OVERRIDES.get(name, []),
    ]

  def __call__(self, step=None, sig=None):
    """Runs to the end, or until `sig` at `step`: SIGTERM from inside at
    that step (tests/drill_driver.py), SIGKILL from here once a progress
    line reaches it (wherever the run is when it lands). For SIGKILL,
    `step` may be a function of the run's number of steps.

    Returns:
      (exit status, output, total steps, the step signalled at or None,
      seconds).
    """
    start = time.perf_counter()
    env = {
      # A user's single-device run: not the 8 fake devices of conftest.
      **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
      "JAX_PLATFORMS": "cpu",
    }
    module = "jaxad.train"
    if sig == signal.SIGTERM:
      module = "tests.drill_driver"
      env["DRILL_SIGNAL_AT"] = f"{step}:SIGTERM"
    proc = subprocess.Popen(
      [sys.executable, "-m", module, *self.flags],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    watchdog = threading.Timer(TIMEOUT_S, proc.kill)
    watchdog.start()
    lines, total, sent = [], None, None
    try:
      for line in proc.stdout:
        lines.append(line)
        m = STEP_LINE.search(line)
        if not m:
          continue
        total = int(m.group(2))
        if callable(step):
          step = step(total)
        if sig == signal.SIGKILL and sent is None and int(m.group(1)) >= step:
          sent = int(m.group(1))
          proc.send_signal(sig)
      rc = proc.wait()
    finally:
      watchdog.cancel()
      proc.stdout.close()
    out = "".join(lines)
    if sig == signal.SIGTERM:
      m = re.search(r"SIGTERM at step (\d+); checkpoint of step \1 in ", out)
      sent = int(m.group(1)) if m else None
    return rc, out, total, sent, time.perf_counter() - start


def targets(name: str, total: int, count: int) -> list[int]:
  """`count` seeded random steps in [1, total), one per equal share."""
  rng = np.random.default_rng([SEED, sum(map(ord, name))])
  edges = np.linspace(1, total, count + 1).astype(int).tolist()
  return [
    int(rng.integers(edges[i], max(edges[i] + 1, edges[i + 1])))
    for i in range(count)
  ]


class DrillTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.cache = os.path.join(cls.root, "cache")

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def eval_json(self, workdir):
    with open(os.path.join(workdir, "eval.json")) as f:
      return evaluate.without_run(json.load(f))

  @parameterized.named_parameters(
    (name, name) for name in conformance_test.SMOKE_CONFIGS
  )
  def test_interrupted_runs_resume_to_the_same_eval_json(self, name):
    config = conformance_test.smoke_config(name)
    missing = [
      r for r in conformance_test.data_roots(config) if not os.path.exists(r)
    ]
    if missing:
      self.skipTest(f"{name}:smoke needs {missing} (../shared is absent)")
    start = time.perf_counter()
    # The uninterrupted run, beside the drill: two processes on two cores
    # (each has its own data cache: two preparations would race).
    full = os.path.join(self.root, f"{name}_full")
    reference = []
    thread = threading.Thread(
      target=lambda: reference.append(
        Run(name, full, os.path.join(self.root, "cache_full"))()
      )
    )
    thread.start()
    drilled = os.path.join(self.root, f"{name}_drill")
    run = Run(name, drilled, os.path.join(self.root, "cache_drill"))
    kinds = KINDS.get(name, THREE)
    steps = None
    timings = []
    for i, sig in enumerate(kinds):
      if steps is None:  # the first: a kill -9, drawn once steps are known
        at = lambda total: targets(name, total, len(kinds))[0]  # noqa: B023
      else:
        at = steps[i]
      rc, out, total, sent, seconds = run(at, sig)
      timings.append(seconds)
      if steps is None and total is not None:
        steps = targets(name, total, len(kinds))
      if i and kinds[i - 1] == signal.SIGKILL:  # the killed run's lock
        self.assertIn("Took over the stale lock", out)
      if sent is None:  # finished before the step: nothing left to drill
        self.assertEqual(rc, 0, out[-3000:])
        break
      self.assertNotIn("Traceback", out)
      if sig == signal.SIGTERM:  # saved the step it was sent at
        self.assertEqual(rc, 143, out[-3000:])
        self.assertGreaterEqual(sent, steps[i])
      else:
        self.assertEqual(rc, -signal.SIGKILL, out[-3000:])
    else:
      rc, out, _, _, seconds = run()
      timings.append(seconds)
      self.assertEqual(rc, 0, out[-3000:])
    thread.join()
    rc, out, _, _, seconds = reference[0]
    self.assertEqual(rc, 0, out[-3000:])
    self.assertEqual(self.eval_json(drilled), self.eval_json(full))
    print(
      f"{name}: drill {time.perf_counter() - start:.0f} s (reference "
      f"{seconds:.0f} s; drilled runs {[round(t) for t in timings]} s)"
    )


if __name__ == "__main__":
  absltest.main()
