r"""A drop-in `conv_general_dilated` whose weight gradient is matmuls.

Why: XLA:CPU (jax 0.10.2) runs a 1x1 convolution 2-5x slower than the
same matmul (forward and both gradients), and computes a kh x kw
convolution's weight gradient as another convolution whose "kernel" is
the whole output map, 1.5-3.5x slower than its forward pass (measured on
the D24FAD decoder's shapes, README "Convolutions on CPU"). This module
computes 1x1 convolutions as matmuls, and for kh x kw ones keeps XLA's
convolution for the forward pass and the input gradient (fast there) but
writes the weight gradient as one matmul per kernel tap.

The maths (NHWC input x, HWIO kernel w, strides s, kernel dilation d,
explicit padding, no groups, no input dilation). With x_p the padded input,

  y[n, p, q, o] = sum_{i, j, c} x_p[n, s p + d i, s q + d j, c] w[i, j, c, o]

so for a cotangent g = dL/dy

  dL/dw[i, j, c, o] = sum_{n, p, q} x_p[n, s p + d i, s q + d j, c]
                                      g[n, p, q, o] = (V_ij^T G)[c, o],

where V_ij [N*P*Q, C] is the tap's strided view of x_p (a slice) and
G [N*P*Q, O] is g: a plain matmul per tap (kh * kw of them), the same sums
as XLA's gradient convolution in another order. A 1x1, stride-1, unpadded
convolution is a matmul over channels and is computed as `dot_general`
in both directions. Thin kh x kw convolutions (fewer than `_MIN_CHANNELS`
input or output channels) stay XLA's: there its gradient convolution was
faster than kh * kw thin matmuls.

Numerics: for kh x kw the forward value and the input gradient are XLA's
own ops (the same as `lax.conv_general_dilated`); the weight gradient,
and for 1x1 all three results, are the same float32 sums of products in
another order (the matmul's blocking instead of Eigen's). Any order of a
float32 sum of n products is within gamma_n sum_m |a_m b_m| of the exact
sum, gamma_n = n u / (1 - n u), u = 2^-24 (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., eq. 3.5): a property of
floating-point summation, whatever CPU (AMD or Intel, any SIMD width,
blocking or FMA use) runs it. The tests check both this module's and
lax's results against an exact float64 reference with that bound (n = C
kh kw for y, at most O kh kw for dx, N P Q for dw), so they hold on any
machine; two orders differ by at most twice the bound, and in practice
far less (blocked sums grow like sqrt(n) u).

Use it as `nnx.Conv(..., conv_general_dilated=cpu_conv.conv_general_dilated)`
(the parameter tree is unchanged: `kernel` [kh, kw, in, out], `bias`), or
call it where `jax.lax.conv_general_dilated` was called. Cases outside the
maths above (feature or batch groups, input dilation, other layouts, more
or fewer than 2 spatial dims) go to `jax.lax.conv_general_dilated`
unchanged.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
# Bound at import: callers may route `jax.lax.conv_general_dilated` here.
_lax_conv = lax.conv_general_dilated
# A kh x kw (not 1x1) convolution takes the matmul weight gradient only
# when both channel counts reach this: measured on this 2-core CPU, per-tap
# matmuls beat XLA's gradient convolution for the D24FAD decoder's 128-512
# channels (1.3-1.6x fwd+bwd) but lost on DDAD's 1-64 channel AE (its
# training step went from 721 to 812 ms), so thin convolutions stay XLA's.
_MIN_CHANNELS = 128


def _as_pairs(padding, in_hw, window, strides) -> tuple | None:
  """Explicit ((lo, hi), (lo, hi)) padding from lax's padding argument."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_hw, window, strides, padding))
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    return None
  return pads


def _ones(v, n: int = 2) -> bool:
  return v is None or tuple(v) == (1,) * n


def conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
  out_sharding=None,
) -> Array:
  """`jax.lax.conv_general_dilated` with a matmul weight gradient.

  Same signature, arguments and result as `jax.lax.conv_general_dilated`
  (see its documentation). NHWC/HWIO 2-D convolutions without groups or
  input dilation take the path in the module docstring (1x1 stride-1
  unpadded: matmuls both ways; kh x kw with >= `_MIN_CHANNELS` channels in
  and out: matmul weight gradient); every other case is passed to
  `jax.lax.conv_general_dilated` as it is.

  Args:
    lhs: [N, H, W, C] input (any float dtype).
    rhs: [kh, kw, C, O] kernel.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision,
      preferred_element_type, out_sharding: as `lax.conv_general_dilated`.

  Returns:
    [N, P, Q, O], equal to `lax.conv_general_dilated`'s value; its weight
    gradient differs by float rounding only (module docstring).

  Raises:
    Whatever `lax.conv_general_dilated` raises for invalid arguments.
  """
  kwargs = dict(
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if out_sharding is not None:
    kwargs["out_sharding"] = out_sharding
  fallback = lambda: _lax_conv(  # noqa: E731
    lhs, rhs, window_strides, padding, **kwargs
  )
  if lhs.ndim != 4 or rhs.ndim != 4 or out_sharding is not None:
    return fallback()
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if (
    dn != _NHWC
    or feature_group_count != 1
    or batch_group_count != 1
    or not _ones(lhs_dilation)
  ):
    return fallback()
  kh, kw = rhs.shape[:2]
  strides = tuple(int(s) for s in window_strides)
  dil = (1, 1) if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  window = ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1)
  pads = _as_pairs(padding, lhs.shape[1:3], window, strides)
  if pads is None or len(strides) != 2 or len(dil) != 2:
    return fallback()
  if not _is_matmul(rhs, strides, pads) and min(rhs.shape[2:]) < _MIN_CHANNELS:
    return fallback()
  return _conv(
    lhs,
    rhs,
    strides,
    pads,
    dil,
    precision,
    preferred_element_type,
  )


def _xla(x, w, strides, pads, dil, precision, pet):
  return _lax_conv(
    x,
    w,
    strides,
    pads,
    rhs_dilation=dil,
    dimension_numbers=_NHWC,
    precision=precision,
    preferred_element_type=pet,
  )


def _is_matmul(w, strides, pads) -> bool:
  return w.shape[:2] == (1, 1) and strides == (1, 1) and pads == ((0, 0),) * 2


def _tap_views(x, kh, kw, strides, pads, dil, out_hw):
  """The kh*kw strided views V_ij of the padded input, each [N, P, Q, C]."""
  n, _, _, c = x.shape
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  (sh, sw), (p, q) = strides, out_hw
  views = []
  for i in range(kh):
    for j in range(kw):
      r0, c0 = i * dil[0], j * dil[1]
      views.append(
        lax.slice(
          xp,
          (0, r0, c0, 0),
          (n, r0 + (p - 1) * sh + 1, c0 + (q - 1) * sw + 1, c),
          (1, sh, sw, 1),
        )
      )
  return views


def _conv(x, w, strides, pads, dil, precision, pet):
  @jax.custom_vjp
  def conv(x, w):
    if _is_matmul(w, strides, pads):
      return lax.dot_general(
        x,
        w[0, 0],
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=pet,
      )
    return _xla(x, w, strides, pads, dil, precision, pet)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    kh, kw, c, o = w.shape
    if _is_matmul(w, strides, pads):
      dx = lax.dot_general(
        g,
        w[0, 0],
        (((3,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
      ).astype(x.dtype)
      views = [x]
    else:
      _, vjp = jax.vjp(
        lambda x_: _xla(x_, w, strides, pads, dil, precision, pet), x
      )
      (dx,) = vjp(g)
      views = _tap_views(x, kh, kw, strides, pads, dil, g.shape[1:3])
    g2 = g.reshape(-1, o)
    dw = [
      lax.dot_general(
        v.reshape(-1, c),
        g2,
        (((0,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
      )
      for v in views
    ]
    dw = jnp.stack(dw).reshape(w.shape).astype(w.dtype)
    return dx.astype(x.dtype), dw

  conv.defvjp(fwd, bwd)
  return conv(x, w)


def auto(*args, **kwargs) -> Array:
  """`conv_general_dilated` on the CPU backend, `lax`'s elsewhere.

  Decided when traced, by `jax.default_backend()`: GPU/TPU convolution
  kernels (cuDNN, ...) have fast weight gradients of their own.
  Arguments and result: as `jax.lax.conv_general_dilated`.
  """
  if jax.default_backend() == "cpu":
    return conv_general_dilated(*args, **kwargs)
  return _lax_conv(*args, **kwargs)


CONV_IMPLS = {
  "xla": _lax_conv,
  "matmul": conv_general_dilated,
  "auto": auto,
}


def select(name: str, key: str = "config.model.conv_impl") -> Callable:
  """The convolution function called `name` (a key of `CONV_IMPLS`).

  "xla": `jax.lax.conv_general_dilated`; "matmul": this module's (weight
  gradient as matmuls, everywhere); "auto": "matmul" on the CPU backend,
  "xla" elsewhere. All three compute the same convolution (module
  docstring) with the same parameters.

  Raises:
    ValueError: an unknown name, naming `key`, the value and the choices.
  """
  if name not in CONV_IMPLS:
    raise ValueError(f"{key} must be one of {sorted(CONV_IMPLS)}, got {name!r}")
  return CONV_IMPLS[name]
