"""Frozen pretrained ResNet teachers (Multi-AD, D2-4FAD, ...).

A teacher is a `resnet.ResNet` whose (params, batch_stats) come from a
torchvision checkpoint, or, offline, from a seeded random init (logged as a
warning: that is no method's published setting). Nothing here reads a
method's config: a method passes the ResNet's keyword arguments, the
weights path and the init key, and keeps the result in its state's
`frozen` field (rebuilt identically on every start, never checkpointed).

`jit_init` is also how a method initialises its own ResNet-sized networks:
eager init of a ResNet takes minutes on a CPU, and its jitted init compiles
2-3x faster without XLA CPU's optimisation passes.
"""

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from absl import logging
from flax import nnx

from jaxad.models import resnet
from jaxad.weights import torchvision

RANDOM = "random"  # teacher weights without a checkpoint (offline runs)
_URL = "https://download.pytorch.org/models/"
# The ImageNet checkpoints of the variants teachers use.
TORCHVISION_URLS = {
  "resnet50": _URL + "resnet50-0676ba61.pth",
  "wide_resnet50_2": _URL + "wide_resnet50_2-95faca4d.pth",
}

# Init runs once per run: XLA CPU compiles the many random ops of a ResNet's
# init 2-3x faster without its optimisation passes, and runtime does not
# matter.
_CPU_INIT_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


def jit_init(
  build: Callable[[jax.Array], nnx.Module],
  tx: optax.GradientTransformation | None = None,
):
  """Jitted key -> (params, batch_stats, opt_state or None) of `build(key)`.

  Built anew on every call (compiled once per run, where it is used): the
  caller owns the result. No out_shardings: the training loop places the
  state. A top-level jit (its CPU compiler options are refused under
  another transform such as jax.eval_shape): call it eagerly.
  """

  def init(key):
    module = build(key)
    params = nnx.state(module, nnx.Param).to_pure_dict()
    stats = nnx.state(module, nnx.BatchStat).to_pure_dict()
    return params, stats, None if tx is None else tx.init(params)

  options = _CPU_INIT_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(init, compiler_options=options)


def build(resnet_kwargs: Mapping[str, Any], key) -> resnet.ResNet:
  """`resnet.ResNet(**resnet_kwargs)` initialised from `key`."""
  return resnet.ResNet(**resnet_kwargs, rngs=nnx.Rngs(key))


def graphdef(resnet_kwargs: Mapping[str, Any]) -> nnx.GraphDef:
  """The graph of `resnet.ResNet(**resnet_kwargs)` (abstract: no init)."""
  return nnx.graphdef(nnx.eval_shape(lambda: build(resnet_kwargs, 0)))


def check_weights(
  weights: str,
  variant: str,
  *,
  method: str,
  key: str = "config.model.teacher_weights",
  variant_key: str = "config.model.variant",
  offline: str = "",
) -> None:
  """Refuses teacher weights that cannot load, before anything is written.

  Args:
    weights: a checkpoint path, RANDOM, or "" (none given).
    variant: the teacher's `resnet.VARIANTS` key (names its download).
    method: the method's name, for the message ("Multi-AD").
    key, variant_key: the config keys of `weights` and `variant`.
    offline: an alternative to `--key=random` shown in the message, e.g.
      " (or configs/multiad.py:offline)".

  Raises:
    ValueError: no weights given; the message names torchvision's URLs and
      the random alternative.
    FileNotFoundError: a checkpoint path that does not exist.
  """
  if not weights:
    urls = ", ".join(f"{v} ({k})" for k, v in TORCHVISION_URLS.items())
    raise ValueError(
      f"{key} is empty. {method}'s teacher is an ImageNet-pretrained "
      f"ResNet: download torchvision's checkpoint for {variant_key}="
      f"{variant!r} ({urls}) and pass --{key}=/path/to/file.pth (or "
      f".safetensors). Without it, --{key}={RANDOM}{offline} trains "
      "against a randomly initialised frozen teacher: runnable offline, "
      "but not the paper's setting."
    )
  if weights != RANDOM and not os.path.isfile(weights):
    raise FileNotFoundError(f"{key}: no such file {weights!r}")


def load_teacher(
  resnet_kwargs: Mapping[str, Any],
  weights: str,
  seed_key: jax.Array,
  *,
  method: str = "",
  key: str = "config.model.teacher_weights",
) -> tuple[dict, dict]:
  """A frozen teacher's (params, batch_stats); the same on every call.

  Args:
    resnet_kwargs: `resnet.ResNet` keyword arguments (no `rngs`).
    weights: a torchvision checkpoint (.pth / .safetensors) of that
      network, or RANDOM: a random init from `seed_key`, logged as a
      warning (not a paper's setting).
    seed_key: PRNG key of the random init (unused with a checkpoint).
    method, key: the method's name and the config key of `weights`, for
      the log lines ("Multi-AD", "config.model.teacher_weights").

  Returns:
    (params, batch_stats) float32 pure dicts for `nnx.merge` with
    `graphdef(resnet_kwargs)`: host arrays from a checkpoint, unplaced
    device arrays from a random init; the caller places them.
  """
  who = f"{method}: the" if method else "The"
  if weights == RANDOM:
    logging.warning(
      "%s frozen teacher is RANDOMLY INITIALISED (%s=%s), not "
      "ImageNet-pretrained: this is not the paper's setting, and its "
      "results are not %s.",
      who,
      key,
      RANDOM,
      f"{method}'s" if method else "the method's",
    )
    init = jit_init(lambda k: build(resnet_kwargs, k))
    params, stats, _ = init(seed_key)
    return params, stats
  params, stats = torchvision.load(weights, dict(resnet_kwargs))
  logging.info(
    "%s teacher %s loaded from %s",
    who,
    resnet_kwargs.get("variant", "resnet50"),
    weights,
  )
  return params, stats
