"""Multi-AD's networks: the teacher, student and discriminator that a
config describes, their cached abstract graphs and jitted initialisers, and
the teacher's weights (a torchvision checkpoint, or a seeded random init).

The caches matter on a CPU: a ResNet's init and train step take tens of
seconds to compile, and a state rebuilt in the same process (evaluation
after training, a resumed run in tests) then compiles nothing again.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
from absl import logging
from flax import nnx

from jaxad import sharding
from jaxad.models import discriminator, resnet
from jaxad.weights import torchvision

RANDOM = "random"  # config.model.teacher_weights without a checkpoint
_URL = "https://download.pytorch.org/models/"
TORCHVISION_URLS = {
  "resnet50": _URL + "resnet50-0676ba61.pth",
  "wide_resnet50_2": _URL + "wide_resnet50_2-95faca4d.pth",
}


def resnet_kwargs(config: mlc.ConfigDict, role: str) -> tuple:
  """`resnet.ResNet` keyword arguments of the teacher or the student, as
  sorted (key, value) pairs (hashable, for the caches below)."""
  m = config.model
  kw = dict(
    variant=m.variant,
    num_blocks=tuple(m.num_blocks) or None,
    stages=4,
    in_channels=3,
    se_reduction=m.se_reduction,
  )
  if role == "teacher":
    # METHODS 4.2 option (a) by default: the plain pretrained network.
    kw |= dict(se=m.teacher_se, dilation=tuple(m.teacher_dilation))
  else:
    kw |= dict(se=m.se, se_stem=m.se_stem, dilation=tuple(m.student_dilation))
  return tuple(sorted(kw.items()))


def disc_kwargs(config: mlc.ConfigDict) -> tuple:
  """Discriminator arguments; its input shape is the student's layer4."""
  m = config.model
  f4 = _layer4_shape(resnet_kwargs(config, "student"), config.data.image_size)
  kw = dict(
    in_channels=f4[-1],
    spatial=f4[1:3],
    channels=tuple(m.disc_channels),
    negative_slope=m.disc_slope,
    dropout=m.disc_dropout,
  )
  return tuple(sorted(kw.items()))


def _module(kind: str, kw: tuple, key) -> nnx.Module:
  cls = discriminator.Discriminator if kind == "disc" else resnet.ResNet
  return cls(**dict(kw), rngs=nnx.Rngs(key))


@functools.lru_cache(maxsize=16)
def graphdef(kind: str, kw: tuple):
  """The graph of a "resnet" or "disc" with keyword arguments `kw`."""
  return nnx.graphdef(nnx.eval_shape(lambda: _module(kind, kw, 0)))


@functools.lru_cache(maxsize=16)
def _layer4_shape(kw: tuple, size: int) -> tuple[int, ...]:
  """[1, H4, W4, C4] of a ResNet's layer4 at input size x size."""
  gd, state = nnx.split(nnx.eval_shape(lambda: _module("resnet", kw, 0)))
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(
    lambda s, x: nnx.merge(gd, s)(x, train=False)["layer4"], state, x
  ).shape


def _split(module) -> tuple[dict, dict]:
  return (
    nnx.state(module, nnx.Param).to_pure_dict(),
    nnx.state(module, nnx.BatchStat).to_pure_dict(),
  )


# Init is run once: XLA CPU compiles the many random ops of a ResNet's init
# 2-3x faster without its optimisation passes, and runtime does not matter.
_CPU_INIT_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


@functools.lru_cache(maxsize=16)
def initializer(kind: str, kw: tuple, tx, mesh: jax.sharding.Mesh):
  """Jitted key -> (params, batch_stats, opt_state or None), replicated.

  Cached, so that rebuilding a state in the same process (evaluate after
  train, tests) compiles nothing. Under jit, as eager init of a ResNet on
  the CPU takes minutes.
  """

  def init(key):
    params, stats = _split(_module(kind, kw, key))
    return params, stats, None if tx is None else tx.init(params)

  options = _CPU_INIT_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(
    init,
    out_shardings=sharding.replicated(mesh),
    compiler_options=options,
  )


def load_teacher(config: mlc.ConfigDict, mesh: jax.sharding.Mesh):
  """The teacher's (params, batch_stats), replicated; the same every call.

  From the torchvision checkpoint `config.model.teacher_weights`, or with
  "random" from a key derived from `config.seed` (logged as a warning:
  that is not the paper's setting).
  """
  kw = resnet_kwargs(config, "teacher")
  path = config.model.teacher_weights
  if path == RANDOM:
    logging.warning(
      "Multi-AD: the frozen teacher is RANDOMLY INITIALISED "
      "(config.model.teacher_weights=random), not ImageNet-pretrained: "
      "this is not the paper's setting, and its results are not Multi-AD's."
    )
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return initializer("resnet", kw, None, mesh)(key)[:2]
  params, stats = torchvision.load(path, dict(kw))
  logging.info(
    "Multi-AD: teacher %s loaded from %s", config.model.variant, path
  )
  return jax.device_put((params, stats), sharding.replicated(mesh))
