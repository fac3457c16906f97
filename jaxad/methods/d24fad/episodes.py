"""D²4FAD's training episodes, drawn on the device (METHODS.md 2.4).

The training pools of every source dataset sit on the device, concatenated
and grouped by source (`pool_source` sorted, each source contiguous). A
step draws B queries by an epoch-wise shuffle of the whole pool, and for
each query K supports from the query's *own* source, uniformly with
replacement among its other images (never the query itself), as the
original's `data.py` pairs a query with K images of its dataset.

The original draws the pairing once (its dataset object fixes the supports
of each query at construction); `resample=True` (the default here,
`data.resample_supports`) draws a fresh pairing every epoch instead. Both
are seeded: `fold_in(noise_key, epoch or 0)`, then the query's index.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxad.data import resident

Array = jax.Array


def source_ranges(pool_source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(start [S], size [S]) of each source's contiguous run in the pool.

  Raises:
    ValueError: the pool is not grouped by source, or a source has fewer
      than 2 images (a query needs another image of its source).
  """
  pool_source = np.asarray(pool_source)
  if np.any(np.diff(pool_source) < 0):
    raise ValueError("the training pool must be grouped by source id")
  sources = int(pool_source.max()) + 1 if len(pool_source) else 0
  size = np.bincount(pool_source, minlength=sources)
  if np.any(size < 2):
    raise ValueError(
      f"every source needs >= 2 training normals, got {size.tolist()}"
    )
  start = np.concatenate([[0], np.cumsum(size)[:-1]])
  return start.astype(np.int32), size.astype(np.int32)


def draw(
  local_step: Array,
  *,
  pool_source: Array,
  start: Array,
  size: Array,
  data_key: Array,
  noise_key: Array,
  batch_size: int,
  shots: int,
  resample: bool,
) -> tuple[Array, Array]:
  """Pool indices of one step's queries and their supports.

  Args:
    local_step: int32 step within the phase.
    pool_source: [N] int32 source id of every pool image (grouped).
    start, size: [S] int32, from `source_ranges`.
    data_key: PRNG key of the query order (epoch-wise shuffle).
    noise_key: PRNG key of the support pairing.
    batch_size: B queries (static).
    shots: K supports per query (static).
    resample: a new pairing every epoch (static).

  Returns:
    (queries [B] int32, supports [K, B] int32): support k of query b is
    from query b's source and is never query b itself.
  """
  pool_source, start, size = map(jnp.asarray, (pool_source, start, size))
  n = pool_source.shape[0]
  queries = resident.sample_indices(n, local_step, data_key, batch_size)
  epoch = local_step // (n // batch_size) if resample else 0
  pairing = jax.random.fold_in(noise_key, epoch)

  def supports_of(q):
    s = pool_source[q]
    # Offsets 1..size-1 from the query within its source: never itself.
    offset = jax.random.randint(
      jax.random.fold_in(pairing, q), (shots,), 1, size[s]
    )
    return start[s] + (q - start[s] + offset) % size[s]

  supports = jax.vmap(supports_of)(queries)  # [B, K]
  return queries, jnp.transpose(supports)
