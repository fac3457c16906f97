"""Self-supervised synthetic anomalies, on the device (METHODS.md 1.8).

DDAD-ASR's `SelfAnomalyDataset`: with probability 1/2 an image is kept as
is (empty mask); otherwise a square box of a *different* training image is
pasted at the same place with a random blend factor, and the whole box is
labelled anomalous (even when the blend factor is near 0, as the original).
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def paste_patches(
  key: Array, images: Array, sources: Array, *, keep_prob: float = 0.5
) -> tuple[Array, Array]:
  """Pastes one blended box of `sources` into each of `images`.

  Args:
    key: PRNG key.
    images: [B, H, W, C] float images (any range; blending is linear).
    sources: [B, H, W, C] the images to paste from (a different image each).
    keep_prob: probability of leaving an image unchanged.

  Returns:
    (images', masks): [B, H, W, C] blended images and [B, H, W] float masks
    (1 inside the box of the altered images, else 0).
  """
  b, h, w, _ = images.shape
  k_keep, k_r, k_c, k_pw, k_alpha = jax.random.split(key, 5)
  core_h, core_w = int(0.8 * h), int(0.8 * w)
  off_h, off_w = int(0.1 * h), int(0.1 * w)
  r = jax.random.randint(k_r, (b,), off_h, off_h + core_h)
  c = jax.random.randint(k_c, (b,), off_w, off_w + core_w)
  # Half-width in [round(0.05 W), round(0.2 W)) as numpy's randint.
  pw = jax.random.randint(k_pw, (b,), round(0.05 * w), round(0.2 * w))
  alpha = jax.random.uniform(k_alpha, (b,))
  paste = jax.random.uniform(k_keep, (b,)) >= keep_prob
  rows = jnp.arange(h)[None, :]  # (1, H)
  cols = jnp.arange(w)[None, :]
  in_r = (rows >= (r - pw)[:, None]) & (rows < (r + pw)[:, None])  # (B, H)
  in_c = (cols >= (c - pw)[:, None]) & (cols < (c + pw)[:, None])  # (B, W)
  box = in_r[:, :, None] & in_c[:, None, :] & paste[:, None, None]  # (B,H,W)
  mask = box.astype(images.dtype)
  weight = (alpha[:, None, None] * mask)[..., None]  # (B, H, W, 1)
  return (1.0 - weight) * images + weight * sources, mask


def other_indices(key: Array, indices: Array, num: int) -> Array:
  """For each index, a uniformly drawn different index in [0, num).

  Args:
    key: PRNG key.
    indices: [B] int indices into a set of `num` >= 2 images.

  Returns:
    [B] indices with out[i] != indices[i].
  """
  shift = jax.random.randint(key, indices.shape, 1, num)
  return (indices + shift) % num
