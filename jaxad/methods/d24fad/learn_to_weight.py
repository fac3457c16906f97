"""Learn-to-weight (L2W): attention of each query over its K supports.

Source: the original's `learn_to_weight.py` (`Learn_to_weight`), as
specified in METHODS.md section 2.2 and recomputed by the golden generator
(`make_d24fad_golden.py`). Features are NHWC.

Per scale s with C channels, for query features q [B, H, W, C] and support
features v [K, B, H, W, C] (support k of query b):

  key_k = phi_s(v_k)                       (1x1 conv C -> C, with bias)
  a[b, k] = <vec(key_k[b]), vec(q[b])> * C^(-1/2)
  w[b, :] = softmax_k(a[b, :])
  s^[b] = sum_k w[b, k] v_k[b]             (the values are NOT projected)
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxad.models import layers

Array = jax.Array
CHANNELS = (256, 512, 1024)  # d1, d2, d3 of the de-WRN-50-2


class LearnToWeight(nnx.Module):
  """`Learn_to_weight()`: one biased 1x1 conv `proj_in{1,2,3}` per scale.

  Parameters (torch keys `proj_in{s}.weight` [C, C, 1, 1], `.bias` [C]):
  `proj_in{s}/kernel` [1, 1, C, C], `proj_in{s}/bias` [C]. 1.38 M
  parameters for the WRN-50-2 widths. Init: PyTorch's `nn.Conv2d` default
  (ASSUMED: `learn_to_weight.py` is not in our copy of the original; the
  golden files load their own values).
  """

  def __init__(self, *, channels: Sequence[int] = CHANNELS, rngs: nnx.Rngs):
    self.channels = tuple(channels)
    for s, c in enumerate(self.channels):
      proj = layers.conv(
        c, c, kernel=1, stride=1, padding=0, use_bias=True, rngs=rngs
      )
      setattr(self, f"proj_in{s + 1}", proj)

  def __call__(
    self, query: Sequence[Array], support: Sequence[Array]
  ) -> tuple[list[Array], list[Array]]:
    """Weights the supports of every query, scale by scale.

    Args:
      query: per scale, [B, H, W, C] query features (float32).
      support: per scale, [K, B, H, W, C] support features; a size-1 B
        (supports shared by all queries, as at test time) is broadcast.

    Returns:
      (weighted, attention): per scale, the weighted support features
      [B, H, W, C] and the softmax weights [B, K] (rows sum to 1).
    """
    weighted, attention = [], []
    for s, (q, v) in enumerate(zip(query, support, strict=True)):
      proj = getattr(self, f"proj_in{s + 1}")
      k_sup, b_sup = v.shape[:2]
      key = proj(v.reshape(k_sup * b_sup, *v.shape[2:]))
      key = key.reshape(v.shape)
      w = support_attention(q, key)
      v = jnp.broadcast_to(v, (k_sup,) + q.shape)
      # sum_k w[b, k] v[k, b]: elementwise, so exact float32 everywhere.
      weighted.append(jnp.sum(w.T[:, :, None, None, None] * v, axis=0))
      attention.append(w)
    return weighted, attention


def support_attention(query: Array, key: Array) -> Array:
  """softmax_k(<vec(key_k), vec(q)> / sqrt(C)): [B, H, W, C] x [K, B', ...].

  The scale is C^(-1/2) although the dot product runs over all C*H*W
  elements (the original's choice, kept for parity): the logits are large
  and the softmax is close to one-hot, i.e. "pick the most similar
  support". A tunable temperature in a later version, if ever.

  The dot product is an elementwise product and a float32 sum (not a
  matmul), so it does not drop to TF32 on GPUs: with near-one-hot
  weights, small logit errors would move the weights visibly.

  Args:
    query: [B, H, W, C].
    key: [K, B, H, W, C] projected supports, or [K, 1, H, W, C].

  Returns:
    [B, K] float32 weights, each row summing to 1.
  """
  c = query.shape[-1]
  # [K, B]; a [K, 1, ...] key broadcasts against the B queries.
  logits = jnp.sum(key * query[None], axis=(2, 3, 4)) * c**-0.5
  return jax.nn.softmax(logits.T, axis=-1)
