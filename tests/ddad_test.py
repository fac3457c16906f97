"""Tests of DDAD's losses, scores, sampling and the (sharded) train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import ddad as ddad_config
from jaxad import loop, sharding
from jaxad.data import oneclass, resident
from jaxad.methods import ddad


def tiny_config(**model):
  c = ddad_config.get_config()
  c.data.image_size = 32
  c.model.num_members = 2
  c.model.width = 0.5
  c.train.batch_size = 8
  c.mesh.data = 1
  c.refine.enabled = False  # tests that need the stage turn it on
  c.model.update(model)
  return c


def tiny_data(n_normal=16, n_unlabeled=8, size=32):
  rng = np.random.default_rng(0)
  img = lambda n: rng.integers(0, 256, (n, size, size, 1), np.uint8)
  return oneclass.OneClassData(
    name="tiny",
    normal=img(n_normal),
    unlabeled=img(n_unlabeled),
    unlabeled_labels=np.zeros(n_unlabeled, np.int32),
    test=img(8),
    test_labels=np.array([0] * 4 + [1] * 4, np.int32),
    test_names=tuple(str(i) for i in range(8)),
  )


class LossAndScoreTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    self.out2 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    self.att = rng.dirichlet(np.ones(5), size=3).astype(np.float32)

  def loss(self, out, att, backbone):
    return jax.jit(
      functools.partial(
        ddad.reconstruction_loss, backbone=backbone, entropy_weight=0.0002
      )
    )(out, self.x, att)

  def test_ae_loss(self):
    out = self.out2[..., :1]
    np.testing.assert_allclose(
      self.loss(out, None, "ae"), np.mean((out - self.x) ** 2), rtol=1e-5
    )

  def test_aeu_loss(self):
    mu, s = self.out2[..., :1], self.out2[..., 1:]
    want = np.mean(np.exp(-s) * (mu - self.x) ** 2) + np.mean(s)
    np.testing.assert_allclose(
      self.loss(self.out2, None, "aeu"), want, rtol=1e-5
    )

  def test_memae_loss(self):
    out = self.out2[..., :1]
    entropy = -np.sum(self.att * np.log(self.att + 1e-12), -1).mean()
    want = np.mean((out - self.x) ** 2) + 0.0002 * entropy
    np.testing.assert_allclose(
      self.loss(out, self.att, "memae"), want, rtol=1e-5
    )

  @parameterized.parameters("ae", "aeu")
  def test_discrepancy_maps(self, backbone):
    rng = np.random.default_rng(1)
    ndm = rng.normal(size=(3, 2, 4, 4, 2)).astype(np.float32)
    udm = rng.normal(size=(3, 2, 4, 4, 2)).astype(np.float32)
    x = rng.uniform(-1, 1, (2, 4, 4, 1)).astype(np.float32)
    if backbone == "ae":
      ndm, udm = ndm[..., :1], udm[..., :1]
    got = jax.jit(functools.partial(ddad.discrepancy_maps, backbone=backbone))(
      ndm, udm, x
    )
    mu_b, mu_a = ndm[..., 0].mean(0), udm[..., 0].mean(0)
    var = (
      np.exp(ndm[..., 1]).mean(0) if backbone == "aeu" else np.ones_like(mu_b)
    )
    std_unbiased = np.std(ndm[..., 0], axis=0, ddof=1)
    np.testing.assert_allclose(
      got["rec"], (x[..., 0] - mu_b) ** 2 / var, rtol=1e-4
    )
    np.testing.assert_allclose(
      got["intra"], std_unbiased / np.sqrt(var), rtol=1e-4
    )
    np.testing.assert_allclose(
      got["inter"], np.abs(mu_a - mu_b) / np.sqrt(var), rtol=1e-4, atol=1e-6
    )

  def test_to_unit_range(self):
    np.testing.assert_allclose(
      resident.to_unit_range(jnp.array([0, 255], jnp.uint8)), [-1.0, 1.0]
    )


class SamplingTest(absltest.TestCase):
  def test_each_epoch_is_a_permutation_and_members_differ(self):
    keys = jax.random.split(jax.random.key(0), 2)
    sample = jax.jit(resident.sample_indices, static_argnums=(0, 3))

    def epoch(key, e):
      return np.concatenate([sample(18, 3 * e + s, key, 6) for s in range(3)])

    first = epoch(keys[0], 0)
    self.assertEqual(sorted(first), list(range(18)))  # never 18, 19
    self.assertFalse(np.array_equal(first, epoch(keys[0], 1)))
    self.assertFalse(np.array_equal(first, epoch(keys[1], 0)))
    np.testing.assert_array_equal(first, epoch(keys[0], 0))


def run_steps(config, mesh, num_steps=2):
  """(params, batch_stats, [metrics per step]) on the host."""
  state = ddad.init_state(config, mesh)
  phase = ddad.phases(config, tiny_data(), mesh)[0]
  history = []
  for _ in range(num_steps):
    state, metrics = phase.step_fn(state, phase.inputs)
    history.append(metrics)
  return jax.device_get((state.params, state.batch_stats, history))


@functools.cache
def reference_run():
  """tiny_config's first 2 steps: one device, float32, members unrolled.

  Computed once for the tests that compare another setting against it.
  """
  config = tiny_config()
  config.train.member_strategy = "unroll"
  return run_steps(config, sharding.make_mesh(config.mesh))


class TrainStepTest(parameterized.TestCase):
  def assert_same_run(self, a, b):
    """Same losses/gradient norms and BN statistics, step by step.

    Parameters are not compared leaf by leaf: Adam's first steps move every
    weight by about +-lr whatever the gradient's size, so float rounding in a
    near-zero gradient flips single weights; the losses of the next step
    would show any real difference.
    """
    (_, stats_a, hist_a), (_, stats_b, hist_b) = a, b
    tight = functools.partial(np.testing.assert_allclose, rtol=1e-4)
    jax.tree.map(tight, hist_a[0], hist_b[0])
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=2e-3),
      hist_a[1:],
      hist_b[1:],
    )
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=2e-4),
      stats_a,
      stats_b,
    )

  def test_members_differ_and_loss_is_finite(self):
    params, _, history = reference_run()
    kernel = params["ndm"]["enc_fc1"]["kernel"]
    self.assertEqual(kernel.shape[0], 2)
    self.assertFalse(np.allclose(kernel[0], kernel[1]))
    self.assertFalse(
      np.allclose(
        params["ndm"]["enc_fc1"]["kernel"], params["udm"]["enc_fc1"]["kernel"]
      )
    )
    for metrics in history:
      for v in metrics.values():
        self.assertTrue(np.isfinite(v))

  def test_unroll_and_vmap_agree(self):
    config = tiny_config()
    config.train.member_strategy = "vmap"
    vmap = run_steps(config, sharding.make_mesh(config.mesh))
    self.assert_same_run(reference_run(), vmap)

  def test_sharded_step_matches_single_device(self):
    self.assertEqual(jax.device_count(), 8, "conftest fakes 8 CPU devices")
    config = tiny_config()
    config.mesh.data = 8
    config.train.member_strategy = "unroll"
    sharded = run_steps(config, sharding.make_mesh(config.mesh))
    self.assert_same_run(reference_run(), sharded)

  def test_several_steps_per_call_match_single_steps(self):
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    single = run_steps(config, mesh, num_steps=4)
    state = ddad.init_state(config, mesh)
    phase = ddad.phases(config, tiny_data(), mesh)[0]
    # The scanned loop of GPU/TPU (CPU unrolls the same steps).
    multi = jax.jit(loop.repeat_steps(phase.step_fn, 2, unroll=False))
    history = []
    for _ in range(2):
      state, metrics = multi(state, phase.inputs)
      history.append(metrics)
    self.assertEqual(int(state.step), 4)
    _, stats, singles = single
    for call, metrics in enumerate(jax.device_get(history)):
      for k, v in metrics.items():
        want = np.mean([singles[2 * call + i][k] for i in range(2)])
        np.testing.assert_allclose(v, want, rtol=2e-3)
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=2e-4),
      jax.device_get(state.batch_stats),
      stats,
    )

  def test_bfloat16_compute_trains_float32_parameters(self):
    config = tiny_config(compute_dtype="bfloat16")
    config.train.member_strategy = "unroll"
    params, stats, history = run_steps(config, sharding.make_mesh(config.mesh))
    for leaf in jax.tree.leaves((params, stats)):
      self.assertEqual(leaf.dtype, np.float32)
    for got, want in zip(history, reference_run()[2], strict=True):
      for k in ("ndm_loss", "udm_loss"):
        self.assertTrue(np.isfinite(got[k]))
        np.testing.assert_allclose(got[k], want[k], rtol=0.05)
        self.assertNotEqual(got[k], want[k])

  def test_batch_must_divide_devices(self):
    config = tiny_config()
    config.train.batch_size = 12
    config.mesh.data = 8
    with self.assertRaisesRegex(ValueError, "divisible"):
      ddad.phases(config, tiny_data(), sharding.make_mesh(config.mesh))

  def test_too_few_normals(self):
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    with self.assertRaisesRegex(ValueError, "fewer than one batch"):
      ddad.phases(config, tiny_data(n_normal=4), mesh)

  def test_phase_lengths_follow_epochs_of_each_module(self):
    config = tiny_config()
    config.epochs = 3
    phases = ddad.phases(
      config, tiny_data(16, 9), sharding.make_mesh(config.mesh)
    )
    # NDM: 16 // 8 = 2 steps/epoch; UDM: 25 // 8 = 3 steps/epoch.
    self.assertEqual([p.num_steps for p in phases], [6, 3])


if __name__ == "__main__":
  absltest.main()
