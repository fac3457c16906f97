"""Tests of D²4FAD's episodes and its method object (the model maths are
golden-checked in d24fad_golden_test.py; end to end: conformance_test)."""

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from configs import d24fad as d24fad_config
from jaxad import config_checks, configlib
from jaxad.methods import d24fad
from jaxad.methods.d24fad import episodes, losses


def draw(step, *, resample=True, shots=3, seed=0):
  source = np.array([0] * 5 + [1] * 2 + [2] * 9, np.int32)
  start, size = episodes.source_ranges(source)
  return source, jax.jit(
    lambda s: episodes.draw(
      s,
      pool_source=source,
      start=start,
      size=size,
      data_key=jax.random.key(seed),
      noise_key=jax.random.key(seed + 1),
      batch_size=4,
      shots=shots,
      resample=resample,
    )
  )(step)


class EpisodeTest(absltest.TestCase):
  def test_supports_come_from_the_query_source_and_never_the_query(self):
    for step in range(8):
      source, (queries, supports) = draw(step)
      self.assertEqual(supports.shape, (3, 4))
      queries, supports = np.asarray(queries), np.asarray(supports)
      for b, q in enumerate(queries):
        self.assertTrue(np.all(source[supports[:, b]] == source[q]))
        self.assertNotIn(q, supports[:, b])

  def test_every_query_once_per_epoch_and_seeded(self):
    # 16 images, batch 4: 4 steps per epoch, each image queried once.
    qs = np.concatenate([np.asarray(draw(s)[1][0]) for s in range(4)])
    self.assertEqual(sorted(qs), list(range(16)))
    a, b = draw(2)[1], draw(2)[1]
    np.testing.assert_array_equal(a[1], b[1])
    self.assertFalse(np.array_equal(draw(2, seed=5)[1][1], a[1]))

  def test_pairing_frozen_or_redrawn_each_epoch(self):
    def pairing(epoch, resample):
      out = {}
      for s in range(4 * epoch, 4 * epoch + 4):
        q, sup = (np.asarray(x) for x in draw(s, resample=resample)[1])
        out |= {int(qi): tuple(sup[:, i]) for i, qi in enumerate(q)}
      return out

    self.assertEqual(pairing(0, False), pairing(1, False))
    self.assertNotEqual(pairing(0, True), pairing(1, True))

  def test_a_source_with_one_image_is_refused(self):
    with self.assertRaisesRegex(ValueError, ">= 2 training normals"):
      episodes.source_ranges(np.array([0, 1, 1]))


class MethodTest(absltest.TestCase):
  def test_config_checks(self):
    config = d24fad_config.get_config()
    with self.assertRaisesRegex(ValueError, "wide_resnet50_2-95faca4d.pth"):
      d24fad.METHOD.check_config(config)
    config = d24fad_config.get_config("offline")
    config.model.bn_mode = "batched"
    with self.assertRaisesRegex(ValueError, "bn_mode"):
      d24fad.METHOD.check_config(config)


class ScoringDataTest(absltest.TestCase):
  """`jaxad.evaluate` may score another target, never one trained on."""

  def config(self, target, exclude=""):
    c = d24fad_config.get_config("offline")
    c.data.sources = tuple(
      dict(format="folders", root=os.path.join(self.root, n), name=n)
      for n in ("a", "b", "c")
    )
    c.data.target, c.data.exclude_sources = target, exclude
    return c

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    for n in ("a", "b", "c"):
      os.makedirs(os.path.join(self.root, n))
    # The run: target a, c excluded, so trained on b only.
    run = self.config("a", exclude="c")
    self.trained = configlib.flatten(configlib.config_dict(run))

  def check(self, config):
    d24fad.METHOD.check_scoring_data(config, self.trained)

  def test_the_run_s_target_and_an_unseen_dataset_may_be_scored(self):
    self.check(self.config("a", exclude="c"))  # the run's own
    self.check(self.config("c"))  # excluded from training: never seen
    self.check(self.config("a"))  # its own target, sources listed anew

  def test_a_training_source_is_refused_naming_the_key(self):
    with self.assertRaisesRegex(
      config_checks.ConfigError,
      r"config\.data\.target='b' was a training source of this run"
      r" \(sources \['b'\], target 'a'\)",
    ):
      self.check(self.config("b"))

  def test_a_run_whose_sources_are_gone_is_refused(self):
    os.rmdir(os.path.join(self.root, "b"))
    with self.assertRaisesRegex(
      config_checks.ConfigError, r"sources cannot be listed.*sources\[1\]"
    ):
      self.check(self.config("c"))


class LossesTest(absltest.TestCase):
  def test_flat_cosine(self):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)))
    np.testing.assert_allclose(losses.flat_cosine_distance(x, x), 0, atol=1e-6)
    np.testing.assert_allclose(losses.flat_cosine_distance(x, -x), 2, atol=1e-6)
    np.testing.assert_allclose(
      losses.total_loss(jnp.float32(1.0), jnp.float32(2.0)), 1.2, rtol=1e-6
    )
    self.assertEqual(losses.anomaly_map([x], [x], 8).shape, (2, 8, 8))
    np.testing.assert_allclose(losses.anomaly_map([x], [x], 8), 0, atol=1e-6)

  def test_resize_align_corners_against_scipy(self):
    from scipy import ndimage

    m = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
    out = np.asarray(losses.resize_align_corners(jnp.asarray(m), 13))
    # scipy's zoom (order 1, grid_mode=False) also maps corners to corners.
    ref = np.stack([ndimage.zoom(x, (13 / 4, 13 / 8), order=1) for x in m])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 0, 0], m[:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(out[:, -1, -1], m[:, -1, -1], rtol=1e-6)

  def test_gaussian_against_scipy(self):
    from scipy import ndimage

    m = np.random.default_rng(0).uniform(size=(2, 20, 40)).astype(np.float32)
    out = np.asarray(losses.gaussian_smooth(jnp.asarray(m), sigma=4.0))
    # Per image (the original blurs across the batch too: a bug).
    ref = np.stack([ndimage.gaussian_filter(x, sigma=4) for x in m])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      losses.image_score(jnp.asarray(ref)), ref.max(axis=(1, 2)), rtol=1e-6
    )


if __name__ == "__main__":
  absltest.main()
