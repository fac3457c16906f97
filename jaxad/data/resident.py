"""Device-resident datasets: sampling on the device, uint8 -> float there.

Small datasets (DDAD's are < 40 MB at 64x64 uint8) are put on the device
once; each step draws its batch there, so nothing crosses from the host per
step (PERFORMANCE.md).
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def to_unit_range(images: Array) -> Array:
  """uint8 [0, 255] -> float32 [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def sample_indices(num: int, step: Array, key: Array, batch_size: int):
  """Indices of batch `step` of an epoch-wise shuffling of range(num).

  The same as a DataLoader(shuffle=True, drop_last=True): a fresh
  permutation per epoch, derived from (key, epoch), so a resumed run draws
  exactly the batches it would have drawn.

  Args:
    num: dataset size (static).
    step: scalar int step within the run of this sampler.
    key: PRNG key of this sampler (e.g. one per ensemble member).
    batch_size: static batch size; the last num % batch_size are dropped.

  Returns:
    [batch_size] int32 indices.
  """
  per_epoch = num // batch_size
  perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), num)
  return jax.lax.dynamic_slice_in_dim(
    perm, (step % per_epoch) * batch_size, batch_size
  )
