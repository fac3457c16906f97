"""The frozen teacher's layer4 of every training-pool image, once per run.

Why: a D²4FAD step decodes the teacher's layer4 of B queries and of their
K supports, so the original encodes (K + 1) B images per step, each pool
image K + 1 times per epoch on average, 70 epochs. The teacher is frozen
(eval-mode BN) and the inputs are not augmented (METHODS.md 2.4: resize and
ToTensor only), so an image's layer4 never changes: computed once here, a
step gathers its rows and runs the teacher on its B queries only, for their
layer1..3 (TSD's targets; XLA drops the unused layer4 there).

Size: h w 2048 float32 per image, h = S / 32 (128 KB at S = 128 px), on
every device; `model.teacher_cache=False` keeps the per-step encoding for
pools that do not fit. The values are the teacher's own, computed in
chunks of another size than a step's batch: equal to the per-step ones up
to float32 summation order (jaxad.models.block_barrier, cpu_conv).
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxad import sharding
from jaxad.models import block_barrier

Array = jax.Array


def pool_layer4(
  model,
  pool: Array,
  mesh: Mesh,
  *,
  encode: Callable[[object, Array], Array],
  chunk: int,
) -> Array:
  """`encode(model, images)` of every pool image, `chunk` images per call.

  Args:
    model: the method's `api.Model` (frozen teacher inside).
    pool: [N, S, S, C] uint8 resident pool, N >= chunk.
    mesh: the run's mesh; the result is replicated over it.
    encode: (model, uint8 [chunk, S, S, C]) -> float32 [chunk, h, w, D],
      traced inside a jit (split the chunk over `data` there).
    chunk: images per call, a multiple of the mesh's data axis.

  Returns:
    float32 [N, h, w, D]: row i is image i's features.

  Raises:
    ValueError: fewer than `chunk` pool images, or (before any compute)
      the result would take over half of a device's memory, where the
      backend reports it (GPU, TPU; not CPU).
  """
  n = pool.shape[0]
  if n < chunk:
    raise ValueError(f"pool of {n} images, fewer than one chunk ({chunk})")
  shape = jax.eval_shape(encode, model, pool[:chunk])
  nbytes = n * shape.dtype.itemsize * math.prod(shape.shape[1:])
  # A device of this process: another's cannot be asked (multi-host).
  me = jax.process_index()
  local = [d for d in mesh.devices.flat if d.process_index == me]
  limit = (local[0].memory_stats() or {}).get("bytes_limit")
  if limit and nbytes > limit / 2:
    raise ValueError(
      f"model.teacher_cache: the teacher's layer4 of the {n} training-pool "
      f"images takes {nbytes / 1e9:.1f} GB per device, over half of its "
      f"{limit / 1e9:.1f} GB: set --config.model.teacher_cache=false "
      "(encode every step) or lower data.max_source_images"
    )
  replicated = sharding.replicated(mesh)

  @functools.partial(
    jax.jit,
    donate_argnums=0,
    out_shardings=replicated,
    compiler_options=block_barrier.compiler_options(),
  )
  def fill(cache, model, pool, start):
    images = jax.lax.dynamic_slice_in_dim(pool, start, chunk)
    return jax.lax.dynamic_update_slice_in_dim(
      cache, encode(model, images), start, 0
    )

  cache = jax.jit(
    lambda: jnp.zeros((n, *shape.shape[1:]), shape.dtype),
    out_shardings=replicated,
  )()
  # The last chunk ends at N (it may overlap the one before): one shape.
  for start in sorted({*range(0, n - chunk, chunk), n - chunk}):
    cache = fill(cache, model, pool, jnp.int32(start))
  return cache


def derive(encode: Callable[[object, Array], Array], *, chunk: int):
  """The `api.Phase.derive` adding {"pool_layer4": `pool_layer4` of the
  inputs' "pool"} (args as there)."""

  def fn(state, inputs: dict, mesh: Mesh) -> dict[str, Array]:
    layer4 = pool_layer4(
      state.model(), inputs["pool"], mesh, encode=encode, chunk=chunk
    )
    return {"pool_layer4": layer4}

  return fn
