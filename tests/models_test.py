"""Tests of the reconstruction AE and its PyTorch-semantics layers."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from jaxad.models import autoencoder, layers


def conv_transpose_reference(x, kernel):
  """Scatter form of torch ConvTranspose2d(k=4, s=2, p=1), in numpy."""
  b, h, w, _ = x.shape
  out = np.zeros((b, 2 * h, 2 * w, kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      for kh in range(4):
        for kw in range(4):
          oh, ow = 2 * i - 1 + kh, 2 * j - 1 + kw
          if 0 <= oh < 2 * h and 0 <= ow < 2 * w:
            out[:, oh, ow] += x[:, i, j] @ kernel[kh, kw]
  return out


class LayersTest(parameterized.TestCase):
  @parameterized.parameters("subpixel", "direct")
  def test_conv_transpose_matches_pytorch_scatter(self, method):
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    k = np.random.default_rng(1).normal(size=(4, 4, 3, 7)).astype(np.float32)
    got = jax.jit(
      lambda x, k: layers.conv_transpose_4s2p1(x, k, method=method)
    )(x, k)
    self.assertEqual(got.shape, (2, 10, 12, 7))
    np.testing.assert_allclose(
      got, conv_transpose_reference(x, k), atol=1e-4, rtol=1e-4
    )

  def test_conv_transpose_rejects_unknown_method(self):
    with self.assertRaisesRegex(ValueError, "subpixel"):
      layers.conv_transpose_4s2p1(
        jnp.ones((1, 2, 2, 1)), jnp.ones((4, 4, 1, 1)), method="fft"
      )

  def test_batchnorm_tracks_unbiased_variance_like_pytorch(self):
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 3, 5))
    bn = layers.BatchNorm(5)
    y = bn(jnp.asarray(x, jnp.float32), train=True)
    flat = x.reshape(-1, 5)
    mean, var = flat.mean(0), flat.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(
      bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5
    )
    y_eval = bn(jnp.asarray(x, jnp.float32), train=False)
    np.testing.assert_allclose(
      y_eval, (x - bn.mean[...]) / np.sqrt(bn.var[...] + 1e-5), atol=1e-4
    )

  def test_batch_normalisation_gradients_match_autodiff_of_the_formula(self):
    def textbook(x, scale, bias):
      mean = jnp.mean(x, (0, 1, 2))
      var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
      y = (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias
      return y, mean, var

    keys = jax.random.split(jax.random.key(0), 5)
    x = 3.0 + 2.0 * jax.random.normal(keys[0], (4, 5, 5, 3))
    scale = jax.random.uniform(keys[1], (3,), minval=0.5, maxval=2.0)
    bias = jax.random.normal(keys[2], (3,))
    w_mean, w_var = jax.random.normal(keys[3], (2, 3))

    def loss(fn):
      def f(x, scale, bias):
        y, mean, var = fn(x, scale, bias)
        # A non-trivial cotangent for every output, statistics included.
        return jnp.sum(jnp.sin(y) * y) + mean @ w_mean + var @ w_var

      return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

    custom = loss(lambda x, s, b: layers.normalize_batch(x, s, b, 1e-5))
    for got, want in zip(custom, loss(textbook), strict=True):
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(
      layers.normalize_batch(x, scale, bias, 1e-5)[0],
      textbook(x, scale, bias)[0],
      atol=2e-5,
    )

  def test_batch_norm_computes_in_float32_and_returns_the_input_dtype(self):
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 3)) * 3 + 2
    bn32, bn16 = layers.BatchNorm(3), layers.BatchNorm(3)
    y32 = bn32(x, train=True)
    y16 = bn16(x.astype(jnp.bfloat16), train=True)
    self.assertEqual(y16.dtype, jnp.bfloat16)
    self.assertEqual(bn16.mean[...].dtype, jnp.float32)
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.05)
    np.testing.assert_allclose(bn16.mean[...], bn32.mean[...], rtol=1e-2)
    y_eval = bn16(x.astype(jnp.bfloat16), train=False)
    self.assertEqual(y_eval.dtype, jnp.bfloat16)

  def test_compute_dtype_names(self):
    self.assertEqual(layers.compute_dtype("bfloat16"), jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "config.model.compute_dtype.*fp16"):
      layers.compute_dtype("fp16")

  def test_pytorch_default_init_bounds(self):
    model = autoencoder.AutoEncoder(rngs=nnx.Rngs(0))
    first = np.asarray(model.enc_convs[0].kernel[...])  # fan_in 1*4*4
    self.assertLessEqual(np.abs(first).max(), 1 / 4)
    self.assertGreater(np.abs(first).max(), 0.2)
    up = np.asarray(model.dec_convs[0].kernel[...])  # fan_in = out*16 = 1024
    self.assertLessEqual(np.abs(up).max(), 1 / 32)
    bias = np.asarray(model.enc_fc1.bias[...])  # fan_in 1024
    self.assertLessEqual(np.abs(bias).max(), 1 / 32)
    self.assertGreater(np.abs(bias).max(), 0.0)


class AutoEncoderTest(parameterized.TestCase):
  @parameterized.parameters(
    ("ae", 4_487_248, 1), ("aeu", 4_487_504, 2), ("memae", 4_487_648, 1)
  )
  def test_shapes_and_parameter_counts(self, backbone, count, channels):
    model = autoencoder.AutoEncoder(backbone=backbone, rngs=nnx.Rngs(0))
    self.assertEqual(
      autoencoder.count_params(nnx.state(model, nnx.Param)), count
    )
    out, attention = model(jnp.zeros((3, 64, 64, 1)), train=True)
    self.assertEqual(out.shape, (3, 64, 64, channels))
    if backbone == "memae":
      self.assertEqual(attention.shape, (3, 25))
      np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    else:
      self.assertIsNone(attention)

  def test_upsample_methods_give_the_same_network(self):
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1)
    outs = [
      autoencoder.AutoEncoder(image_size=32, upsample=m, rngs=nnx.Rngs(0))(
        x, train=False
      )[0]
      for m in ("subpixel", "direct")
    ]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)

  @parameterized.parameters("ae", "aeu", "memae")
  def test_bfloat16_compute_keeps_float32_parameters_and_output(self, backbone):
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 1), minval=-1)
    nets = {
      d: autoencoder.AutoEncoder(
        backbone=backbone, image_size=32, dtype=d, rngs=nnx.Rngs(0)
      )
      for d in (jnp.float32, jnp.bfloat16)
    }
    # The same parameters (a checkpoint serves both), all float32.
    p32, p16 = (nnx.state(n, nnx.Param).to_pure_dict() for n in nets.values())
    jax.tree.map(np.testing.assert_array_equal, p32, p16)
    for leaf in jax.tree.leaves(p16):
      self.assertEqual(leaf.dtype, jnp.float32)
    out32, _ = nets[jnp.float32](x, train=True)
    out16, att16 = nets[jnp.bfloat16](x, train=True)
    self.assertEqual(out16.dtype, jnp.float32)
    if att16 is not None:
      self.assertEqual(att16.dtype, jnp.float32)
    # bf16 keeps 8 mantissa bits (rounding ~0.4% per op); through ~10
    # layers and train-mode BN the output drifts by about 1% of its scale.
    scale = float(jnp.abs(out32).max())
    err = np.abs(np.asarray(out16) - np.asarray(out32))
    self.assertLess(err.mean(), 0.02 * scale)
    self.assertLess(err.max(), 0.1 * scale)
    self.assertFalse(np.array_equal(out16, out32))  # it really ran in bf16
    for bn in nets[jnp.bfloat16].enc_bns:
      self.assertEqual(bn.mean[...].dtype, jnp.float32)
      self.assertEqual(bn.var[...].dtype, jnp.float32)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "backbone"):
      autoencoder.AutoEncoder(backbone="vae", rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "multiple of 16"):
      autoencoder.AutoEncoder(image_size=40, rngs=nnx.Rngs(0))


if __name__ == "__main__":
  absltest.main()
