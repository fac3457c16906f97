"""Tests of the shared loop: multi-step calls, phase-local steps, host
batches, throughput units."""

import json
import os
import signal
import tempfile

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl.testing import absltest

from jaxad import checkpoint, loop, sharding
from jaxad.methods import api


@flax.struct.dataclass
class Counter:
  step: jax.Array
  total: jax.Array
  local: jax.Array  # the last phase-local step seen


def count_step(state, inputs, local_step):
  """Adds `inputs` to the total; the metric is the global step index."""
  new = state.replace(total=state.total + jnp.sum(inputs), local=local_step)
  return new, {"loss": state.step.astype(jnp.float32)}


def counter():
  return Counter(step=jnp.int32(0), total=jnp.float32(0.0), local=jnp.int32(0))


def train(phases, steps_per_call=1, state=None, **kw):
  mesh = sharding.make_mesh(mlc.ConfigDict({"data": 1}))
  workdir = tempfile.mkdtemp()
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints")
  seen = []
  args = dict(log_every=4, checkpoint_every=8) | kw
  state = loop.train(
    loop.place(state or counter(), mesh),
    loop.compile_phases(phases, mesh, steps_per_call),
    workdir=workdir,
    checkpointer=ckpt,
    on_step=seen.append,
    **args,
  )
  ckpt.close()
  with open(f"{workdir}/metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  return state, seen, logged


def phase(name, num_steps, members=1, **kw):
  kw.setdefault("inputs", jnp.float32(1.0))
  return api.Phase(
    name, num_steps, count_step, 2, "train.batch_size", members=members, **kw
  )


class LoopTest(absltest.TestCase):
  def test_calls_never_cross_log_or_checkpoint_boundaries(self):
    state, seen, logged = train([phase("count", 10)], steps_per_call=3)
    # 3 steps where they fit before the next multiple of 4 or 8, else one.
    self.assertEqual(seen, [3, 4, 7, 8, 9, 10])
    self.assertEqual((int(state.step), float(state.total)), (10, 10.0))
    # Logged losses are step-weighted means of the step indices 0..9.
    self.assertEqual([r["step"] for r in logged], [4, 8, 10])
    np.testing.assert_allclose(
      [r["loss"] for r in logged], [1.5, 5.5, 8.5], rtol=1e-6
    )

  def test_phase_local_step_and_member_throughput(self):
    state, _, logged = train([phase("a", 3), phase("b", 4, members=3)])
    self.assertEqual((int(state.step), int(state.local)), (7, 3))
    by_phase = {r["phase"]: r for r in logged}
    self.assertNotIn("member_images_per_s", by_phase["a"])
    np.testing.assert_allclose(
      by_phase["b"]["member_images_per_s"], 3 * by_phase["b"]["images_per_s"]
    )

  def test_host_batches_resume_at_the_phase_local_step(self):
    asked = []

    def batches(first):
      asked.append(first)
      for i in range(first, 6):
        yield np.full((2,), i, np.float32)  # sum = 2i

    p = phase("host", 6, inputs=None, batches=batches)
    state, seen, _ = train([phase("a", 2), p], steps_per_call=3)
    self.assertEqual(seen, list(range(1, 9)))  # host batches: one per call
    self.assertEqual(float(state.total), 2.0 + 2 * sum(range(6)))
    # Resumed 3 steps into the host phase: the iterator starts at 3.
    resumed = counter().replace(step=jnp.int32(5), total=jnp.float32(0.0))
    state, _, _ = train([phase("a", 2), p], state=resumed)
    self.assertEqual(asked[-1], 3)
    self.assertEqual(float(state.total), 2 * (3 + 4 + 5))

  def test_phase_needs_inputs_or_batches_and_a_fitting_batch(self):
    mesh = sharding.make_mesh(mlc.ConfigDict({"data": 1}))
    with self.assertRaisesRegex(ValueError, "exactly one of inputs"):
      loop.compile_phases([phase("x", 1, inputs=None)], mesh, 1)
    mesh8 = sharding.make_mesh(mlc.ConfigDict({"data": 8}))
    with self.assertRaisesRegex(ValueError, "config.train.batch_size=2"):
      loop.compile_phases([phase("x", 1)], mesh8, 1)

  def test_host_batches_of_the_wrong_shape_or_too_few_are_named(self):
    def short(first):
      yield from [np.ones((2,), np.float32)] * (2 - first)

    with self.assertRaisesRegex(ValueError, "'host'.*ended before"):
      train([phase("host", 3, inputs=None, batches=short)])

    def wrong(first):
      while True:
        yield {"x": np.ones((3,), np.float32)}

    with self.assertRaisesRegex(ValueError, r"\['x'\] has shape \(3,\)"):
      train([phase("host", 3, inputs=None, batches=wrong)])

  def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(self):
    mesh = sharding.make_mesh(mlc.ConfigDict({"data": 1}))
    workdir = tempfile.mkdtemp()
    ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints")
    # Restored afterwards: default_int_handler, or SIG_IGN under nohup.
    before = signal.getsignal(signal.SIGINT)

    def signal_at(step):
      if step == 5:
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C mid-run

    with self.assertRaises(KeyboardInterrupt):
      loop.train(
        loop.place(counter(), mesh),
        loop.compile_phases([phase("count", 10)], mesh, 1),
        workdir=workdir,
        checkpointer=ckpt,
        log_every=2,
        checkpoint_every=100,
        on_step=signal_at,
      )
    self.assertEqual(ckpt.latest_step(), 5)
    # Resumed from step 5: the records logged after it are dropped first.
    with open(f"{workdir}/metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": 6, "loss": 0.0}) + "\n")
    state = ckpt.restore_latest(loop.place(counter(), mesh))
    loop.train(
      state,
      loop.compile_phases([phase("count", 10)], mesh, 1),
      workdir=workdir,
      checkpointer=ckpt,
      log_every=2,
      checkpoint_every=100,
    )
    ckpt.close()
    with open(f"{workdir}/metrics.jsonl") as f:
      steps = [json.loads(line)["step"] for line in f]
    self.assertEqual(steps, [2, 4, 6, 8, 10])
    self.assertIs(signal.getsignal(signal.SIGINT), before)

  def test_derived_inputs_once_per_run_in_every_step(self):
    calls = []

    def derive(state, inputs, mesh):
      calls.append(int(state.step))
      return {"extra": jnp.float32(2.0) * inputs["base"]}

    def step(state, inputs, local_step):
      del local_step
      new = state.replace(total=state.total + inputs["base"] + inputs["extra"])
      return new, {"loss": jnp.float32(0.0)}

    p = api.Phase(
      "derived", 7, step, 2, "train.batch_size",
      inputs={"base": jnp.float32(1.0)}, derive=derive,
    )  # fmt: skip
    state, _, _ = train([phase("a", 2), p], steps_per_call=3)
    self.assertEqual(calls, [2])  # once, when the phase starts
    self.assertEqual(float(state.total), 2.0 + 7 * 3.0)
    # A resumed run derives them again, from the restored state.
    resumed = counter().replace(step=jnp.int32(6), total=jnp.float32(0.0))
    state, _, _ = train([phase("a", 2), p], state=resumed)
    self.assertEqual((calls, float(state.total)), ([2, 6], 3 * 3.0))
    # A finished phase derives nothing.
    mesh = sharding.make_mesh(mlc.ConfigDict({"data": 1}))
    loop.train(
      loop.place(counter().replace(step=jnp.int32(9)), mesh),
      loop.compile_phases([phase("a", 2), p], mesh, 1),
      workdir=tempfile.mkdtemp(),
      checkpointer=checkpoint.Checkpointer(f"{tempfile.mkdtemp()}/c"),
      log_every=4,
      checkpoint_every=8,
    )
    self.assertEqual(calls, [2, 6])
    with self.assertRaisesRegex(ValueError, "derive needs dict inputs"):
      loop.compile_phases([phase("x", 1, derive=derive)], mesh, 1)

  def test_steps_per_call_must_be_positive(self):
    with self.assertRaisesRegex(ValueError, "steps_per_call"):
      loop.jit_steps(count_step, steps_per_call=0, out_shardings=None)


if __name__ == "__main__":
  absltest.main()
