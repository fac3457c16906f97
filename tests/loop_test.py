"""Tests of the shared loop's scheduling of multi-step calls."""

import json
import tempfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxad import checkpoint, loop


@flax.struct.dataclass
class Counter:
  step: jax.Array
  total: jax.Array


def count_step(state, inputs):
  """Adds `inputs` to the total; the metric is the step index."""
  new = Counter(step=state.step + 1, total=state.total + inputs)
  return new, {"loss": state.step.astype(jnp.float32)}


class MultiStepLoopTest(absltest.TestCase):
  def test_calls_never_cross_log_or_checkpoint_boundaries(self):
    single, multi = loop.jit_steps(
      count_step, steps_per_call=3, out_shardings=None
    )
    phase = loop.Phase(
      "count",
      10,
      single,
      jnp.float32(1.0),
      member_images_per_step=1,
      images_per_step=1,
      multi_step_fn=multi,
      steps_per_call=3,
    )
    workdir = tempfile.mkdtemp()
    ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints")
    seen = []
    state = loop.train(
      Counter(step=jnp.int32(0), total=jnp.float32(0.0)),
      [phase],
      workdir=workdir,
      checkpointer=ckpt,
      log_every=4,
      checkpoint_every=8,
      on_step=seen.append,
    )
    ckpt.close()
    # 3 steps where they fit before the next multiple of 4 or 8, else one.
    self.assertEqual(seen, [3, 4, 7, 8, 9, 10])
    self.assertEqual((int(state.step), float(state.total)), (10, 10.0))
    with open(f"{workdir}/metrics.jsonl") as f:
      logged = [json.loads(line) for line in f]
    # Logged losses are step-weighted means of the step indices 0..9.
    self.assertEqual([r["step"] for r in logged], [4, 8, 10])
    np.testing.assert_allclose(
      [r["loss"] for r in logged], [1.5, 5.5, 8.5], rtol=1e-6
    )

  def test_steps_per_call_must_be_positive(self):
    with self.assertRaisesRegex(ValueError, "steps_per_call"):
      loop.jit_steps(count_step, steps_per_call=0, out_shardings=None)


if __name__ == "__main__":
  absltest.main()
