"""Residual block outputs kept in memory on CPU (models/block_barrier.py)."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from jaxad import evaluate, loop, sharding
from jaxad.models import block_barrier, resnet, reverse_decoder

pytestmark = pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="barriers are added on CPU only"
)


def _stage(rngs):
  """Two torchvision bottlenecks after a de-ResNet up-bottleneck."""
  kwargs = dict(
    stride=1,
    dilation=1,
    width_per_group=64,
    se="none",
    se_reduction=16,
    zero_init_residual=False,
    rngs=rngs,
  )
  return [
    reverse_decoder.UpBottleneck(32, 8, width_per_group=64, rngs=rngs),
    resnet.Bottleneck(32, 8, **kwargs),
    resnet.Bottleneck(32, 8, **kwargs),
  ]


def _loss_and_grads(barrier: bool, monkeypatch):
  if not barrier:
    monkeypatch.setattr(block_barrier, "keep", lambda x: x)
  blocks = _stage(nnx.Rngs(0))
  graphdef, params, stats = nnx.split(blocks, nnx.Param, nnx.BatchStat)
  params, stats = params.to_pure_dict(), stats.to_pure_dict()
  x = jax.random.normal(jax.random.key(1), (4, 4, 4, 32), jnp.float32)

  def loss(params):
    out = x
    for block in nnx.merge(graphdef, params, stats):
      out = block(out, train=True)
    return jnp.mean(out**2), out

  options = block_barrier.compiler_options() if barrier else None
  step = jax.jit(
    jax.value_and_grad(loss, has_aux=True), compiler_options=options
  )
  (value, out), grads = step(params)
  return step.lower(params).compile().as_text(), value, out, grads


def _forward(blocks):
  graphdef, params, stats = nnx.split(blocks, nnx.Param, nnx.BatchStat)
  params, stats = params.to_pure_dict(), stats.to_pure_dict()

  def run(params, x):
    for block in nnx.merge(graphdef, params, stats):
      x = block(x, train=False)
    return x

  return run, params


def test_every_block_type_keeps_its_output(monkeypatch):
  # If XLA renames its barrier pass, the barriers vanish silently and the
  # CPU step slows down again: this fails first.
  x = jnp.ones((2, 4, 4, 32), jnp.float32)
  options = block_barrier.compiler_options()
  assert options == {"xla_disable_hlo_passes": "cse_barrier_expander"}
  for block, count in [(_stage(nnx.Rngs(0))[:1], 1), (_stage(nnx.Rngs(0)), 3)]:
    run, params = _forward(block)
    hlo = jax.jit(run, compiler_options=options).lower(params, x).compile()
    assert hlo.as_text().count("opt-barrier") == count
  hlo, *_ = _loss_and_grads(True, monkeypatch)
  assert hlo.count("opt-barrier") >= 3


def test_the_shared_jits_keep_the_barriers():
  run, params = _forward(_stage(nnx.Rngs(0)))
  x = jnp.ones((2, 4, 4, 32), jnp.float32)
  step, _ = loop.jit_steps(
    lambda state, x: (state, run(state, x)), steps_per_call=1,
    out_shardings=None,
  )  # fmt: skip
  assert "opt-barrier" in step.lower(params, x).compile().as_text()

  class Scorer:  # the one method call score_fn makes
    def score(self, config, model, context, images):
      return run(model, images)

  mesh = sharding.make_mesh(mlc.ConfigDict({"data": 1, "member": 1}))
  score = evaluate.score_fn(Scorer(), None, mesh)
  assert "opt-barrier" in score.lower(params, None, x).compile().as_text()


def test_off_adds_no_barrier_for_export():
  run, params = _forward(_stage(nnx.Rngs(0)))
  x = jnp.ones((2, 4, 4, 32), jnp.float32)
  with block_barrier.off():
    assert block_barrier.compiler_options() is None
    exported = jax.export.export(jax.jit(run), platforms=["cpu", "cuda"])(
      params, x
    )
  assert "optimization_barrier" not in exported.mlir_module()
  assert block_barrier.compiler_options() is not None  # restored


def test_barriers_change_no_value(monkeypatch):
  _, value, out, grads = _loss_and_grads(True, monkeypatch)
  hlo, value0, out0, grads0 = _loss_and_grads(False, monkeypatch)
  assert "opt-barrier" not in hlo
  # Not bitwise equal in general: the same float32 operations, but XLA's
  # fusion differs, which may reorder a reduction's sum (BN statistics
  # over 64 values, convolution sums over <= 72 products): each such
  # sum is within gamma_n ~ n u
  # (u = 2^-24) of exact, far inside 1e-5 relative for n <= 72 (Higham,
  # "Accuracy and Stability of Numerical Algorithms", eq. 3.5), also after
  # the few layers here.
  np.testing.assert_allclose(out, out0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, value0, rtol=1e-5)
  for g, g0 in zip(
    jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True
  ):
    scale = float(jnp.max(jnp.abs(g0))) or 1.0
    np.testing.assert_allclose(g / scale, g0 / scale, atol=1e-5)


def test_keep_is_the_identity():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(jax.jit(block_barrier.keep)(x), x)
  g = jax.grad(lambda x: jnp.sum(block_barrier.keep(x) * x))(x)
  np.testing.assert_array_equal(g, 2 * x)
