"""Tests of jaxad.models.cpu_conv against lax.conv_general_dilated.

Both implementations are checked against an exact float64 reference with
the float32 summation bound of the maths (Higham, Accuracy and Stability
of Numerical Algorithms, 2nd ed., eq. 3.5): for a sum of n products,
|fl(sum) - sum| <= gamma_n sum |a_i b_i|, gamma_n = n u / (1 - n u),
u = 2^-24, for ANY order of summation and any blocking or FMA use. So the
tests hold on every x86 CPU (AMD, Intel, any SIMD width); the reference
itself and the bound are computed in float64, where their own rounding is
~1e-16 relative, negligible next to gamma_n.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from jaxad.models import cpu_conv

U32 = 2.0**-24


def gamma(n: int) -> float:
  return n * U32 / (1 - n * U32)


def reference(x, w, g, strides, pads, dil):
  """float64 (y, dx, dw) and the same with |.| operands (the bounds' sums).

  y[n,p,q,o] = sum_{i,j,c} xp[n, s p + d i, s q + d j, c] w[i,j,c,o]; dx
  and dw are its adjoints, written as scatter / contraction per tap.
  """
  kh, kw, c, o = w.shape
  (sh, sw), (dh, dw_) = strides, dil
  _, p, q, _ = g.shape

  def run(x, w, g):
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    y = np.zeros(g.shape)
    dxp = np.zeros(xp.shape)
    dw = np.zeros(w.shape)
    for i in range(kh):
      for j in range(kw):
        rows = slice(i * dh, i * dh + (p - 1) * sh + 1, sh)
        cols = slice(j * dw_, j * dw_ + (q - 1) * sw + 1, sw)
        v = xp[:, rows, cols, :]
        y += np.einsum("npqc,co->npqo", v, w[i, j])
        dxp[:, rows, cols, :] += np.einsum("npqo,co->npqc", g, w[i, j])
        dw[i, j] = np.einsum("npqc,npqo->co", v, g)
    h, wd = x.shape[1:3]
    dx = dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + wd]
    return y, dx, dw

  exact = run(*(np.asarray(a, np.float64) for a in (x, w, g)))
  absolute = run(*(np.abs(np.asarray(a, np.float64)) for a in (x, w, g)))
  return exact, absolute


def conv_with(fn, strides, pads, dil):
  def conv(x, w):
    return fn(
      x,
      w,
      strides,
      pads,
      rhs_dilation=dil,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  return conv


# (N, H, W, C, O, k, stride, padding, dilation), the models' kinds:
# ResNet 3x3 / strided 3x3 / 1x1 / strided 1x1 shortcut / 7x7 stem,
# DDAD's 4x4 stride-2 encoder and 3x3 sub-pixel convs, Multi-AD dilation.
CASES = (
  ("3x3", 2, 8, 8, 4, 6, 3, 1, 1, 1),
  ("3x3_s2", 2, 9, 9, 3, 5, 3, 2, 1, 1),
  ("1x1", 2, 6, 6, 8, 4, 1, 1, 0, 1),
  ("1x1_s2", 2, 8, 8, 4, 8, 1, 2, 0, 1),
  ("7x7_s2_stem", 1, 12, 12, 3, 4, 7, 2, 3, 1),
  ("4x4_s2_ddad", 3, 8, 8, 1, 4, 4, 2, 1, 1),
  ("3x3_d2", 2, 9, 9, 3, 4, 3, 1, 2, 2),
  ("3x3_valid_odd", 2, 7, 10, 3, 2, 3, 2, 0, 1),
)


class CpuConvTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    # The tiny test shapes take the matmul path too (the default keeps
    # kh x kw convolutions under 128 channels on XLA's).
    self.enter_context(mock.patch.object(cpu_conv, "_MIN_CHANNELS", 1))

  @parameterized.named_parameters(*CASES)
  def test_value_and_gradients_within_float32_bound(
    self, n, h, w_, c, o, k, s, p, d
  ):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w_, c)).astype(np.float32)
    w = rng.standard_normal((k, k, c, o)).astype(np.float32)
    strides, pads, dil = (s, s), ((p, p), (p, p)), (d, d)
    ours = conv_with(cpu_conv.conv_general_dilated, strides, pads, dil)
    lax_ = conv_with(jax.lax.conv_general_dilated, strides, pads, dil)
    y, vjp = jax.vjp(jax.jit(ours), x, w)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = jax.jit(vjp)(g)
    y_l, vjp_l = jax.vjp(jax.jit(lax_), x, w)
    dx_l, dw_l = vjp_l(g)
    self.assertEqual(y.shape, y_l.shape)
    (y64, dx64, dw64), (y_abs, dx_abs, dw_abs) = reference(
      x, w, g, strides, pads, dil
    )
    # Terms per entry: y k*k*C, dx at most k*k*O, dw N*P*Q.
    terms = {"y": k * k * c, "dx": k * k * o, "dw": int(np.prod(y.shape[:3]))}
    for name, got, exact, absolute in (
      ("y", y, y64, y_abs),
      ("dx", dx, dx64, dx_abs),
      ("dw", dw, dw64, dw_abs),
    ):
      bound = gamma(terms[name]) * absolute
      # lax's own result obeys the same bound (the reference is right).
      lax_got = {"y": y_l, "dx": dx_l, "dw": dw_l}[name]
      for label, arr in (("cpu_conv", got), ("lax", lax_got)):
        err = np.abs(np.asarray(arr, np.float64) - exact)
        self.assertTrue(
          np.all(err <= bound),
          f"{label} {name}: max excess {np.max(err - bound)}",
        )
      self.assertEqual(got.dtype, np.float32)

  def test_forward_is_xla_conv_bit_for_bit(self):
    # Not a 1x1 (a matmul there): the forward IS lax's convolution.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    args = ((1, 1), ((1, 1), (1, 1)))
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = jax.jit(
      lambda x, w: cpu_conv.conv_general_dilated(x, w, *args, **kw)
    )
    ref = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, *args, **kw))
    np.testing.assert_array_equal(ours(x, w), ref(x, w))

  @parameterized.parameters("SAME", "VALID")
  def test_string_padding(self, padding):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 7, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(fn):
      return lambda x, w: jnp.sum(jnp.sin(fn(x, w, (2, 2), padding, **kw)))

    got = jax.grad(loss(cpu_conv.conv_general_dilated), (0, 1))(x, w)
    want = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def test_groups_and_other_layouts_fall_back_to_lax(self):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
    args = ((1, 1), ((1, 1), (1, 1)))
    got = cpu_conv.conv_general_dilated(x, w, *args, **kw)
    np.testing.assert_array_equal(
      got, jax.lax.conv_general_dilated(x, w, *args, **kw)
    )
    xn = x.transpose(0, 3, 1, 2)
    wn = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)  # OIHW
    nchw = dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))
    got = cpu_conv.conv_general_dilated(xn, wn, *args, **nchw)
    np.testing.assert_array_equal(
      got, jax.lax.conv_general_dilated(xn, wn, *args, **nchw)
    )

  def test_nnx_conv_drop_in_keeps_the_parameter_tree(self):
    def build(**kw):
      return nnx.Conv(
        4, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0), **kw
      )

    ours = build(conv_general_dilated=cpu_conv.conv_general_dilated)
    ref = build()
    self.assertEqual(
      jax.tree.map(jnp.shape, nnx.state(ours, nnx.Param).to_pure_dict()),
      jax.tree.map(jnp.shape, nnx.state(ref, nnx.Param).to_pure_dict()),
    )
    x = np.random.default_rng(4).standard_normal((2, 5, 5, 4), np.float32)

    def grads(m):
      gd, params = nnx.split(m, nnx.Param)
      loss = lambda p: jnp.sum(jnp.square(nnx.merge(gd, p)(x)))  # noqa: E731
      return jax.jit(jax.grad(loss))(params).to_pure_dict()

    got, want = grads(ours), grads(ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def test_vmap_and_bfloat16(self):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.bfloat16)
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(fn):
      def f(x, w):
        y = jax.vmap(lambda xi: fn(xi, w, (1, 1), ((1, 1), (1, 1)), **kw))(x)
        return jnp.sum(y.astype(jnp.float32) ** 2)

      return f

    got = jax.jit(jax.grad(loss(cpu_conv.conv_general_dilated), (0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(jax.lax.conv_general_dilated), (0, 1)))(x, w)
    for a, b in zip(got, want, strict=True):
      self.assertEqual(a.dtype, jnp.bfloat16)
      # bfloat16 results (8-bit mantissa) rounded from different float32 sums.
      np.testing.assert_allclose(
        np.asarray(a, np.float32),
        np.asarray(b, np.float32),
        rtol=0.05,
        atol=0.5,
      )

  def test_thin_convolutions_stay_xla(self):
    x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 8))
    one = jnp.ones((1, 1, 8, 8))
    args = ((1, 1), ((1, 1), (1, 1)))
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = cpu_conv.conv_general_dilated
    with mock.patch.object(cpu_conv, "_MIN_CHANNELS", 128):
      thin = str(jax.make_jaxpr(lambda x, w: conv(x, w, *args, **kw))(x, w))
      # A 1x1 is a matmul at any width.
      dot = str(
        jax.make_jaxpr(lambda x, w: conv(x, w, (1, 1), "VALID", **kw))(x, one)
      )
    self.assertNotIn("custom_vjp", thin)
    self.assertIn("custom_vjp", dot)

  def test_select(self):
    with self.assertRaisesRegex(ValueError, "model.conv_impl.*'fft'"):
      cpu_conv.select("fft")
    self.assertIs(cpu_conv.select("xla"), jax.lax.conv_general_dilated)
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    args = ((1, 1), ((1, 1), (1, 1)))
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for name, custom in (("matmul", True), ("auto", True), ("xla", False)):
      conv = cpu_conv.select(name)
      jaxpr = str(
        jax.make_jaxpr(lambda x, w, c=conv: c(x, w, *args, **kw))(x, w)
      )
      # The tests run on the CPU backend: auto takes the matmul path.
      self.assertEqual("custom_vjp" in jaxpr, custom, name)


if __name__ == "__main__":
  absltest.main()
