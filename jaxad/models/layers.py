"""Layers with PyTorch semantics, so that ports are exact and checkpoints load.

* `torch_uniform`: PyTorch's default init, U(+-1/sqrt(fan_in)) (kaiming-uniform
  with a=sqrt(5) for weights, and the same bound for biases).
* `BatchNorm`: normalises with the biased batch variance but tracks the
  *unbiased* one in its running average, as `torch.nn.BatchNorm*d` does (Flax's
  own BatchNorm tracks the biased one). Momentum is PyTorch's (0.1 = weight of
  the new batch).
* `UpConv2x`: `torch.nn.ConvTranspose2d(k=4, stride=2, padding=1, bias=False)`,
  computed either directly (dilated conv) or as a 3x3 conv to 4x channels
  followed by depth-to-space ("sub-pixel"). Both express exactly the same map
  from the same kernel; the sub-pixel form avoids XLA CPU's slow backward pass
  of strided transposed convolutions (docs: PERFORMANCE.md).

Mixed precision: `conv`, `linear` and `UpConv2x` take a compute `dtype`
(parameters stay float32; inputs and kernels are cast for the op), and
`BatchNorm` always computes its statistics and normalisation in float32,
returning its input's dtype.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxad.models import cpu_conv

Array = jax.Array
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, key: str = "config.model.compute_dtype"):
  """The jnp dtype called `name`; a ValueError naming `key` otherwise."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(
      f"{key} must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}"
    )
  return COMPUTE_DTYPES[name]


def torch_uniform(fan_in: int):
  """Initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(
  in_ch: int,
  out_ch: int,
  *,
  kernel: int,
  stride: int,
  padding: int,
  use_bias: bool,
  rngs: nnx.Rngs,
  dtype=jnp.float32,
) -> nnx.Conv:
  """A `torch.nn.Conv2d` equivalent (NHWC), PyTorch-initialised; computes in
  `dtype` with float32 parameters."""
  fan_in = in_ch * kernel * kernel
  return nnx.Conv(
    in_ch,
    out_ch,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    use_bias=use_bias,
    kernel_init=torch_uniform(fan_in),
    bias_init=torch_uniform(fan_in),
    dtype=dtype,
    param_dtype=jnp.float32,
    # On CPU: 1x1 as matmuls, wide kh x kw with a matmul weight gradient.
    conv_general_dilated=cpu_conv.auto,
    rngs=rngs,
  )


def linear(
  in_f: int, out_f: int, *, rngs: nnx.Rngs, dtype=jnp.float32
) -> nnx.Linear:
  """A `torch.nn.Linear` equivalent, PyTorch-initialised; computes in `dtype`
  with float32 parameters."""
  return nnx.Linear(
    in_f,
    out_f,
    kernel_init=torch_uniform(in_f),
    bias_init=torch_uniform(in_f),
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


class BatchNorm(nnx.Module):
  """BatchNorm over all axes but the last, with PyTorch's statistics."""

  def __init__(
    self,
    num_features: int,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
  ):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum = momentum
    self.eps = eps

  def __call__(self, x: Array, *, train: bool) -> Array:
    """Normalises x [..., C] in float32 and returns x's dtype."""
    dtype, x = x.dtype, x.astype(jnp.float32)
    if train:
      y, mean, var = normalize_batch(
        x, self.scale[...], self.bias[...], self.eps
      )
      n = math.prod(x.shape[:-1])
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * mean
      self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
      return y.astype(dtype)
    inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
    return (x * inv + (self.bias[...] - self.mean[...] * inv)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(
  x: Array, scale: Array, bias: Array, eps: float
) -> tuple[Array, Array, Array]:
  """Training-mode batch normalisation over all axes but the last.

  The statistics come from one pass over x (sum and sum of squares) and the
  backward pass needs one reduction and one elementwise pass. XLA CPU ran
  the autodiff of the textbook formula as many separate full-size passes;
  this form made the DDAD training step faster (README, Throughput).

  Args:
    x: [..., C] activations.
    scale, bias: [C] affine parameters.
    eps: added to the variance.

  Returns:
    (y [..., C], batch mean [C], biased batch variance [C]).
  """
  return _normalize_fwd(x, scale, bias, eps)[0]


def _normalize_fwd(x, scale, bias, eps):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
  inv = jax.lax.rsqrt(var + eps)
  gain = scale * inv
  y = x * gain + (bias - mean * gain)
  return (y, mean, var), (x, mean, inv, scale)


def _normalize_bwd(eps, residuals, cotangents):
  del eps
  x, mean, inv, scale = residuals
  g_y, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  sum_g = jnp.sum(g_y, axes)
  g_bias = sum_g
  g_scale = inv * (jnp.sum(g_y * x, axes) - mean * sum_g)  # sum(g_y * xhat)
  xhat = (x - mean) * inv
  g_x = (scale * inv / n) * (n * g_y - sum_g - xhat * g_scale)
  # The batch statistics are outputs too (for the running averages).
  g_x = g_x + g_mean / n + (2.0 / n) * g_var * (x - mean)
  return g_x, g_scale, g_bias


normalize_batch.defvjp(_normalize_fwd, _normalize_bwd)


# _PHASE_TAPS[a, d, k] = 1 when output phase `a` (even/odd output row) reads
# input offset d-1 through kernel tap k, for ConvTranspose(k=4, s=2, p=1):
# y[2m] = x[m] w[1] + x[m-1] w[3];  y[2m+1] = x[m+1] w[0] + x[m] w[2].
_PHASE_TAPS = np.zeros((2, 3, 4), np.float32)
_PHASE_TAPS[0, 0, 3] = _PHASE_TAPS[0, 1, 1] = 1.0
_PHASE_TAPS[1, 1, 2] = _PHASE_TAPS[1, 2, 0] = 1.0

_DIMS = ("NHWC", "HWIO", "NHWC")


def subpixel_kernel(kernel: Array) -> Array:
  """[4, 4, I, O] transposed-conv kernel -> [3, 3, I, 4*O] sub-pixel kernel.

  Output channel order is (row phase, column phase, O), matching
  `depth_to_space`.
  """
  taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
  k = jnp.einsum("adk,bel,klio->deiabo", taps, taps, kernel)
  return k.reshape(3, 3, kernel.shape[2], 4 * kernel.shape[3])


def depth_to_space(x: Array) -> Array:
  """[B, H, W, 4*C] with channels (a, b, C) -> [B, 2H, 2W, C]."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, 2, 2, c4 // 4)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, H, a, W, b, C)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)


def conv_transpose_4s2p1(x: Array, kernel: Array, *, method: str) -> Array:
  """PyTorch ConvTranspose2d(k=4, s=2, p=1) on NHWC.

  Args:
    x: [B, H, W, I].
    kernel: [4, 4, I, O], `kernel[kh, kw, i, o] = torch_weight[i, o, kh, kw]`.
    method: "subpixel" or "direct" (the same map).

  Returns:
    [B, 2H, 2W, O].
  """
  if method == "subpixel":
    y = jax.lax.conv_general_dilated(
      x,
      subpixel_kernel(kernel),
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=_DIMS,
    )
    return depth_to_space(y)
  if method == "direct":
    # The transpose of a strided conv: dilate the input, pad k-1-p = 2, and
    # correlate with the spatially flipped kernel.
    return jax.lax.conv_general_dilated(
      x,
      kernel[::-1, ::-1],
      (1, 1),
      ((2, 2), (2, 2)),
      lhs_dilation=(2, 2),
      dimension_numbers=_DIMS,
    )
  raise ValueError(
    f"upsample method must be 'subpixel' or 'direct', got {method!r}"
  )


class UpConv2x(nnx.Module):
  """`torch.nn.ConvTranspose2d(in, out, 4, 2, 1, bias=False)` on NHWC."""

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    *,
    method: str,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
  ):
    # PyTorch computes fan_in of a transposed conv from weight dim 1 (= out).
    init = torch_uniform(out_ch * 16)
    self.kernel = nnx.Param(init(rngs.params(), (4, 4, in_ch, out_ch)))
    self.method = method
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    """[B, H, W, I] -> [B, 2H, 2W, O] in the compute dtype."""
    return conv_transpose_4s2p1(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      method=self.method,
    )
