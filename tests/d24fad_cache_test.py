"""Tests of D²4FAD's teacher cache (`model.teacher_cache`): the layer4 of
every pool image computed once per run, against the per-step encoding."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from configs import d24fad as d24fad_config
from jaxad import bench, loop, sharding
from jaxad.methods import d24fad
from jaxad.methods.d24fad import teacher_cache

# Two float32 evaluations of the same network on the same image, in batches
# of other sizes, differ only in summation order (XLA may block a
# convolution's or BN's sums differently per batch shape): each sum of n
# products is within gamma_n ~ n u (u = 2^-24) of exact (Higham, eq. 3.5),
# n <= 9 * 512 here, so ~3e-4 relative worst case per layer and, as the
# errors are not all aligned, far less in practice. 1e-4 of the feature
# scale holds across the smoke teacher's four blocks; a missing or
# misplaced row (zeros, another image) is off by O(1).
RTOL = 1e-4


def _setup(teacher_cache_on: bool, num_images: int = 40):
  config = d24fad_config.get_config("smoke")
  config.model.teacher_cache = teacher_cache_on
  config.mesh = mlc.ConfigDict({"data": 2, "member": 1})
  mesh = sharding.make_mesh(config.mesh)
  method = d24fad.METHOD
  data = method.synthetic_data(config, num_images)
  state = loop.place(method.init_state(config), mesh)
  (phase,) = loop.compile_phases(method.phases(config, data), mesh, 1)
  return config, mesh, data, state, phase


def _encode_all(state, pool):
  """The teacher's layer4 of the whole pool in one batch."""
  return jax.jit(
    lambda model, x: d24fad._encode(model, d24fad.to_input(x))["layer4"]
  )(state.model(), jnp.asarray(pool))


def test_every_row_is_its_image_layer4():
  _, mesh, data, state, _ = _setup(True, num_images=11)  # 2 x 5 pool images
  pool = jnp.asarray(data.pools)
  encode = jax.jit(
    lambda model, x: d24fad._encode(model, d24fad.to_input(x))["layer4"]
  )
  with jax.set_mesh(mesh):
    # chunk 4 over 10 images: chunks at 0, 4 and (overlapping) 6.
    cache = teacher_cache.pool_layer4(
      state.model(), pool, mesh, encode=encode, chunk=4
    )
  expected = _encode_all(state, pool)
  assert cache.shape == expected.shape == (10, 1, 1, 2048)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(cache / scale, expected / scale, atol=RTOL)
  with pytest.raises(ValueError, match="fewer than one chunk"):
    teacher_cache.pool_layer4(
      state.model(), pool[:3], mesh, encode=encode, chunk=4
    )


def test_derived_before_the_first_step():
  _, _, data, state, phase = _setup(True)
  assert "pool_layer4" not in phase.inputs
  derived = phase.with_derived(state)
  cache = derived.inputs["pool_layer4"]
  assert cache.shape == (len(data.pools), 1, 1, 2048)
  scale = float(jnp.max(jnp.abs(cache)))
  np.testing.assert_allclose(
    cache / scale, _encode_all(state, data.pools) / scale, atol=RTOL
  )
  _, _, _, _, off = _setup(False)
  assert off.with_derived(state) is off  # nothing to derive
  # A pool smaller than a step's (K + 1) B = 24 images: chunks of B.
  _, _, small, state, phase = _setup(True, num_images=20)
  cache = phase.with_derived(state).inputs["pool_layer4"]
  assert cache.shape == (len(small.pools), 1, 1, 2048) == (20, 1, 1, 2048)
  scale = float(jnp.max(jnp.abs(cache)))
  np.testing.assert_allclose(
    cache / scale, _encode_all(state, small.pools) / scale, atol=RTOL
  )


def _one_step(teacher_cache_on: bool):
  _, mesh, _, state, phase = _setup(teacher_cache_on)
  phase = phase.with_derived(state)
  inputs = phase.next_inputs(None)
  with jax.set_mesh(mesh):
    compiled = phase.step_fn.lower(state, inputs).compile()
    _, metrics = compiled(state, inputs)
  return jax.device_get(metrics), bench._flops(compiled)


def test_the_step_is_the_same_and_encodes_the_queries_only():
  cached, flops = _one_step(True)
  per_step, flops0 = _one_step(False)
  # The same loss and gradient norm: the cache only moves where layer4 is
  # computed (summation order, see RTOL).
  for key in ("loss", "ssd_loss", "tsd_loss", "l2_grads"):
    np.testing.assert_allclose(cached[key], per_step[key], rtol=RTOL)
  # K = 2 supports per query are no longer encoded every step.
  if flops and flops0:
    assert flops < flops0


class _Device:
  process_index = 0

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return {"bytes_limit": self.limit}


class _Mesh:
  def __init__(self, limit):
    other = _Device(0)  # another process's: never asked
    other.process_index = 1
    self.devices = np.array([other, _Device(limit)])


def test_a_cache_over_half_the_device_memory_is_refused_before_compute():
  _, _, data, state, _ = _setup(True, num_images=11)
  pool = jnp.asarray(data.pools)  # 10 images x 2048 float32 = 81,920 bytes
  calls = []

  def encode(model, x):
    calls.append(x.shape)  # traced by eval_shape only, then refused
    return d24fad._encode(model, d24fad.to_input(x))["layer4"]

  with pytest.raises(ValueError, match=r"teacher_cache=false"):
    teacher_cache.pool_layer4(
      state.model(), pool, _Mesh(100_000), encode=encode, chunk=4
    )
  assert calls == [(4, 32, 32, 3)]
