"""Tests of the ASR-Net model and the synthetic-anomaly generator."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from jaxad import evaluate, loop, sharding
from jaxad.data import synthesis
from jaxad.methods.ddad import METHOD
from jaxad.methods.ddad import refine as ddad_refine
from jaxad.models import autoencoder, refine
from tests import ddad_test


class ASRNetTest(absltest.TestCase):
  def test_shapes_and_parameter_count(self):
    net = refine.ASRNet(rngs=nnx.Rngs(0))
    # conv1 2*9*128+128, conv2 128*9*128+128, conv3 128*9*2+2, 2 BNs.
    want = (2 * 9 * 128 + 128) + (128 * 9 * 128 + 128) + (128 * 9 * 2 + 2)
    want += 2 * 2 * 128
    self.assertEqual(autoencoder.count_params(nnx.state(net, nnx.Param)), want)
    self.assertEqual(
      net(jnp.zeros((2, 64, 64, 2)), train=True).shape, (2, 64, 64, 2)
    )
    r_intra = refine.ASRNet(in_channels=1, rngs=nnx.Rngs(0))
    self.assertEqual(
      r_intra(jnp.zeros((1, 8, 8, 1)), train=False).shape, (1, 8, 8, 2)
    )

  def test_bfloat16_compute_gives_float32_logits_close_to_float32(self):
    maps = jax.random.uniform(jax.random.key(1), (2, 16, 16, 2))
    nets = [
      refine.ASRNet(dtype=d, rngs=nnx.Rngs(0))
      for d in (jnp.float32, jnp.bfloat16)
    ]
    want, got = (net(maps, train=True) for net in nets)
    self.assertEqual(got.dtype, jnp.float32)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=0.05 * scale)


class SynthesisTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.images = jnp.asarray(rng.uniform(-1, 1, (64, 64, 64, 1)), jnp.float32)
    self.sources = jnp.asarray(rng.uniform(-1, 1, (64, 64, 64, 1)), jnp.float32)

  def paste(self, seed):
    return jax.jit(synthesis.paste_patches)(
      jax.random.key(seed), self.images, self.sources
    )

  def test_mask_is_exactly_the_blended_box(self):
    out, mask = map(np.asarray, self.paste(0))
    images, sources = np.asarray(self.images), np.asarray(self.sources)
    altered = 0
    for i in range(len(out)):
      changed = np.abs(out[i, ..., 0] - images[i, ..., 0]) > 0
      inside = mask[i] > 0
      self.assertFalse(np.any(changed & ~inside))  # nothing outside the box
      if not inside.any():
        continue
      altered += 1
      rows, cols = np.nonzero(inside)
      # A square box of side 2*pw (clipped), pw in [3, 13).
      h = rows.max() - rows.min() + 1
      w = cols.max() - cols.min() + 1
      self.assertEqual(inside.sum(), h * w)
      self.assertLessEqual(max(h, w), 24)
      self.assertGreaterEqual(max(h, w), 6)
      # out = (1 - a) x + a src inside, with one a in [0, 1] per image.
      diff = (sources[i] - images[i])[inside]
      big = np.abs(diff) > 0.1  # avoid dividing by ~0
      alpha = (out[i] - images[i])[inside][big] / diff[big]
      self.assertTrue(0.0 <= alpha.mean() <= 1.0)
      np.testing.assert_allclose(alpha, alpha.mean(), atol=1e-3)
    self.assertBetween(altered, 16, 48)  # about half of 64

  def test_reproducible_for_a_seed(self):
    a, b, c = self.paste(3), self.paste(3), self.paste(4)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    self.assertFalse(np.array_equal(a[1], c[1]))

  def test_other_indices_differ(self):
    idx = jnp.arange(100) % 7
    other = synthesis.other_indices(jax.random.key(0), idx, 7)
    self.assertTrue(np.all(np.asarray(other) != np.asarray(idx)))
    self.assertTrue(np.all((np.asarray(other) >= 0) & (np.asarray(other) < 7)))


class FocalLossTest(absltest.TestCase):
  def test_against_numpy(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
    mask = (rng.uniform(size=(2, 3, 3)) > 0.5).astype(np.float32)
    got = jax.jit(ddad_refine.focal_loss)(logits, mask)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    y = np.clip(np.stack([1 - mask, mask], -1), 1e-5, 1 - 1e-5)
    p_t = (y * p).sum(-1) + 1e-5
    np.testing.assert_allclose(got, -((1 - p_t) ** 2) * np.log(p_t), rtol=1e-5)


class RefinePhaseTest(absltest.TestCase):
  def test_refine_step_trains_only_the_asr_net(self):
    config = ddad_test.tiny_config()
    config.refine.update(enabled=True, epochs=1, batch_size=4)
    mesh = sharding.make_mesh(config.mesh)
    data = ddad_test.tiny_data()
    state = loop.place(METHOD.init_state(config), mesh)
    phases = loop.compile_phases(METHOD.phases(config, data), mesh, 1)
    self.assertEqual(
      [p.phase.name for p in phases], ["ensembles", "udm_tail", "refine"]
    )
    self.assertEqual(phases[2].phase.num_steps, 16 // 4)
    before = jax.device_get(state.params)
    refine_phase = phases[2]
    with jax.set_mesh(mesh):
      state, metrics = refine_phase.step_fn(state, refine_phase.inputs)
    after = jax.device_get(state.params)
    for module in ("ndm", "udm"):  # frozen: bit-identical
      jax.tree.map(np.testing.assert_array_equal, before[module], after[module])
    changed = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), before["asr"], after["asr"]
    )
    self.assertTrue(all(jax.tree.leaves(changed)))
    self.assertTrue(np.isfinite(jax.device_get(metrics["asr_loss"])))
    out = evaluate.score_fn(METHOD, config, mesh)(
      state.model(), None, data.test
    )
    self.assertEqual(set(out["scores"]), {"rec", "intra", "inter", "r_dual"})
    r = np.asarray(out["maps"]["r_dual"])
    self.assertEqual(r.shape, (8, 32, 32))
    self.assertTrue(np.all((r >= 0) & (r <= 1)))

  def test_unknown_inputs(self):
    config = ddad_test.tiny_config()
    config.refine.inputs = "both"
    with self.assertRaisesRegex(ValueError, "refine.inputs"):
      ddad_refine.score_name(config)


if __name__ == "__main__":
  absltest.main()
