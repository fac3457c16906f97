"""SIGTERM is handled like Ctrl-C (step finished, checkpoint, exit 143), and
the ETA prices every phase at its own measured speed."""

import os
import re
import signal
import tempfile
import threading
from unittest import mock

import ml_collections as mlc
from absl.testing import absltest

from jaxad import checkpoint, eta, loop, preemption, sharding, train
from tests import loop_test


def run_loop(phases, workdir, on_step=None, log_every=2):
  mesh = sharding.make_mesh(mlc.ConfigDict({"data": 1}))
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints")
  try:
    return loop.train(
      loop.place(loop_test.counter(), mesh),
      loop.compile_phases(phases, mesh, 1),
      workdir=workdir,
      checkpointer=ckpt,
      log_every=log_every,
      checkpoint_every=100,
      on_step=on_step,
    )
  finally:
    ckpt.close()


class SigtermTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    # A handler of the caller's, which the loop must put back.
    self.seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: self.seen.append(s))
    self.addCleanup(signal.signal, signal.SIGTERM, previous)

  def latest(self):
    ckpt = checkpoint.Checkpointer(f"{self.workdir}/checkpoints")
    step = ckpt.latest_step()
    ckpt.close()
    return step

  def test_sigterm_finishes_the_step_saves_and_stops_with_143(self):
    def term_at(step):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's kill

    with self.assertRaises(preemption.Stopped) as stopped:
      with self.assertLogs("absl", "WARNING") as logs:
        run_loop([loop_test.phase("count", 10)], self.workdir, term_at)
    self.assertIsInstance(stopped.exception, KeyboardInterrupt)
    self.assertEqual(stopped.exception.signum, signal.SIGTERM)
    self.assertEqual(preemption.exit_code(stopped.exception), 143)
    self.assertEqual(self.latest(), 3)  # the step in flight, saved
    self.assertTrue(
      any("SIGTERM at step 3; checkpoint of step 3" in m for m in logs.output),
      logs.output,
    )
    # The caller's handler is back, and untouched by the loop's signal.
    self.assertEqual(self.seen, [])
    os.kill(os.getpid(), signal.SIGTERM)
    self.assertEqual(self.seen, [signal.SIGTERM])

  def test_off_the_main_thread_no_handler_is_installed(self):
    handlers = []
    done = []

    def record(step):
      handlers.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(
      target=lambda: done.append(
        run_loop([loop_test.phase("count", 3)], self.workdir, record)
      )
    )
    thread.start()
    thread.join()
    self.assertLen(done, 1)
    self.assertEqual(int(done[0].step), 3)
    self.assertTrue(all(h is handlers[0] for h in handlers))
    self.assertNotIsInstance(
      getattr(handlers[0], "__self__", None), preemption.StopOnSignal
    )

  def test_cli_exit_codes(self):
    for error, code in (
      (preemption.Stopped(signal.SIGTERM), 143),
      (preemption.Stopped(signal.SIGINT), 130),
      (KeyboardInterrupt(), 130),  # Ctrl-C outside the loop
    ):
      with (
        mock.patch.object(train, "run", side_effect=error),
        mock.patch.object(train, "cli"),  # no flags parsed in a test
        mock.patch.object(train.sharding, "initialize_distributed"),
        self.assertRaises(SystemExit) as exit_,
      ):
        train.main([])
      self.assertEqual(exit_.exception.code, code, error)
    self.assertEqual(train.EXIT_SIGTERM, 143)


class EtaTest(absltest.TestCase):
  def test_text_says_unknown_for_phases_not_measured(self):
    self.assertEqual(eta.eta_text([("a", 10, 2.0), ("b", 5, 4.0)]), "0m40s")
    self.assertEqual(
      eta.eta_text([("a", 10, 2.0), ("b", 5, None), ("c", 0, None)]),
      "0m20s + unknown (b not measured yet)",
    )
    self.assertEqual(
      eta.eta_text([("a", 3, None), ("b", 5, None)]),
      "unknown (a, b not measured yet)",
    )
    self.assertEqual(eta.format_seconds(3.7 * 3600), "3h42m")

  def test_each_phase_is_priced_at_its_own_speed(self):
    now = [0.0]
    with mock.patch.object(eta.time, "perf_counter", lambda: now[0]):
      clock = eta.StepClock(2)
      clock.restart(0)  # phase 0: 1 s per step
      now[0] = 4.0
      clock.lap(0, 4)
      self.assertIsNone(clock.seconds_per_step(1))
      self.assertEqual(
        clock.eta(["fast", "slow"], [6, 50]),
        "0m06s + unknown (slow not measured yet)",
      )
      now[0] = 10.0  # phase 1's compile, left out by the restart
      clock.restart(10)
      now[0] = 30.0  # 10 s per step, measured on its own steps
      clock.lap(1, 12)
      self.assertEqual(clock.seconds_per_step(1), 10.0)
      # 48 slow steps at 10 s, not at the fast phase's 1 s.
      self.assertEqual(clock.eta(["fast", "slow"], [0, 48]), "8m00s")

  def test_the_loop_logs_later_phases_as_unknown_until_measured(self):
    with self.assertLogs("absl", "INFO") as logs:
      run_loop(
        [loop_test.phase("a", 4), loop_test.phase("b", 4)],
        tempfile.mkdtemp(),
        log_every=1,
      )
    eta_of = {
      int(m.group(1)): m.group(2)
      for line in logs.output
      if (m := re.search(r"\] step (\d+)/8 .*\| ETA (.*)$", line))
    }
    self.assertLen(eta_of, 8)
    # Step 1 includes phase a's compile: nothing is measured yet.
    self.assertEqual(eta_of[1], "unknown (a, b not measured yet)")
    self.assertRegex(eta_of[2], r"^0m00s \+ unknown \(b not measured yet\)$")
    self.assertEqual(eta_of[4], "unknown (b not measured yet)")
    self.assertEqual(eta_of[5], "unknown (b not measured yet)")
    self.assertEqual(eta_of[6], "0m00s")


if __name__ == "__main__":
  absltest.main()
