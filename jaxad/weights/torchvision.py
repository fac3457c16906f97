"""torchvision ResNet / Wide-ResNet state dicts -> `jaxad.models.resnet`.

The Flax tree mirrors torchvision's module names, so the map is per leaf
(torchvision key -> Flax collection, path):
* `conv1.weight` [O, I, kh, kw] -> params `conv1/kernel` [kh, kw, I, O];
* `bn1.weight`, `bn1.bias` -> params `bn1/scale`, `bn1/bias`;
* `bn1.running_mean`, `bn1.running_var` -> batch_stats `bn1/mean`, `bn1/var`;
* `layerS.B.convK.*`, `layerS.B.bnK.*` -> `layerS/B/convK/*`, `layerS/B/bnK/*`;
* `layerS.B.downsample.0.weight` -> params `layerS/B/downsample/conv/kernel`,
  and `layerS.B.downsample.1.*` -> `layerS/B/downsample/bn/*`;
* `layerS.B.se.fc{1,2}.{weight,bias}` -> params `layerS/B/se/fc{1,2}/*`, in
  timm's SE-ResNet names, weights [O, I] or [O, I, 1, 1] -> kernel [I, O]
  (no torchvision checkpoint has SE; untested against a real timm file).

`*.num_batches_tracked` and `fc.*` (the classifier) are skipped, the latter
with a log line, as are whole stages the model does not build (a teacher
without layer4 loads the full checkpoint). Anything else is strict: an
unmapped or mis-shaped key, or a Flax leaf without a checkpoint value, raises
a ValueError naming the key, the leaf and both shapes.

Typical use (the teacher of Multi-AD / D2-4FAD):

  model = resnet.ResNet("wide_resnet50_2", stages=3, rngs=nnx.Rngs(0))
  params, batch_stats = torchvision.load("wide_resnet50_2-95faca4d.pth", model)
  teacher = nnx.merge(nnx.graphdef(model), params, batch_stats)
"""

import collections
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxad import weights
from jaxad.models import resnet

# BN leaves: (collection, Flax name) -> torch name.
_BN = {
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
_STAGE = re.compile(r"layer(\d+)\.")


def _flatten(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _torch_key(collection: str, path: tuple) -> str:
  """The torchvision state-dict key of one Flax leaf."""
  *mods, leaf = [str(p) for p in path]
  is_bn = mods[-1].startswith("bn")
  if mods[-2:-1] == ["downsample"]:  # torch's nn.Sequential(conv, bn)
    mods[-1] = {"conv": "0", "bn": "1"}[mods[-1]]
  if is_bn:
    name = _BN[collection, leaf]
  else:  # conv or SE linear
    name = {"kernel": "weight", "bias": "bias"}[leaf]
  return ".".join(mods + [name])


def _to_flax(value: np.ndarray, leaf_shape: tuple) -> np.ndarray | None:
  """A torch tensor in the Flax leaf's layout, or None if it cannot fit."""
  if len(leaf_shape) == 4 and value.ndim == 4:  # conv: OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if len(leaf_shape) == 2 and value.ndim in (2, 4):  # linear: [O, I] -> [I, O]
    if value.ndim == 4:  # timm's SE as a 1x1 conv
      if value.shape[2:] != (1, 1):
        return None
      value = value[:, :, 0, 0]
    return value.T
  return value if value.ndim == len(leaf_shape) else None


def _abstract_trees(model_or_config) -> tuple[dict, dict, int]:
  """(params, batch_stats) pure dicts, and the number of stages built."""
  if isinstance(model_or_config, resnet.ResNet):
    model = model_or_config
  elif isinstance(model_or_config, Mapping):
    config = dict(model_or_config)
    model = nnx.eval_shape(lambda: resnet.ResNet(**config, rngs=nnx.Rngs(0)))
  else:
    raise TypeError(
      "model_or_config must be a resnet.ResNet or a dict of its keyword "
      f"arguments, got {type(model_or_config).__name__}"
    )
  params = nnx.state(model, nnx.Param).to_pure_dict()
  stats = nnx.state(model, nnx.BatchStat).to_pure_dict()
  return params, stats, model.stages


def convert(
  state_dict: Mapping[str, np.ndarray],
  model_or_config: "resnet.ResNet | Mapping[str, Any]",
  *,
  missing: str = "error",
) -> tuple[dict, dict]:
  """Maps a torchvision ResNet state dict onto a `resnet.ResNet`.

  Args:
    state_dict: {torchvision key: array}, e.g. from `weights.read_state_dict`.
    model_or_config: the target model, or the keyword arguments of
      `resnet.ResNet` (built abstractly, no compute).
    missing: "error" (default) raises when a Flax leaf gets no checkpoint
      value; "keep" keeps the model's own values for those leaves (e.g.
      randomly initialised SE blocks), which needs a model, not a config.

  Returns:
    (params, batch_stats): pure dicts of the layout of
    `nnx.state(model, nnx.Param / nnx.BatchStat).to_pure_dict()`, with host
    numpy arrays of the Flax leaves' dtypes (conv kernels HWIO, [kh, kw, I,
    O]); merge with `nnx.merge(graphdef, params, batch_stats)`.

  Raises:
    ValueError: on an unmapped key, a shape mismatch, or (with "error") a
      Flax leaf left without a value. The message lists every such key with
      its checkpoint shape and the Flax leaf and shape.
  """
  if missing not in ("error", "keep"):
    raise ValueError(f"missing must be 'error' or 'keep', got {missing!r}")
  if missing == "keep" and not isinstance(model_or_config, resnet.ResNet):
    raise ValueError("missing='keep' needs a model to take the values from")
  params, stats, stages = _abstract_trees(model_or_config)
  trees = {"params": _flatten(params), "batch_stats": _flatten(stats)}
  targets = {}  # torch key -> (collection, Flax path, Flax leaf)
  for collection, flat in trees.items():
    for path, leaf in flat.items():
      targets[_torch_key(collection, path)] = (collection, path, leaf)

  filled = {c: {} for c in trees}
  errors, skipped = [], collections.Counter()
  for key, value in state_dict.items():
    value = np.asarray(value)
    stage = _STAGE.match(key)
    if key.endswith(".num_batches_tracked"):
      skipped["num_batches_tracked"] += 1
    elif key.startswith("fc."):
      skipped["fc (classifier)"] += 1
    elif key not in targets and stage and int(stage[1]) > stages:
      skipped[f"layer{stage[1]} (not built)"] += 1
    elif key not in targets:
      errors.append(
        f"checkpoint key {key} {value.shape}: no Flax leaf of this model "
        "corresponds to it"
      )
    else:
      collection, path, leaf = targets[key]
      flax_value = _to_flax(value, tuple(leaf.shape))
      if flax_value is None or flax_value.shape != tuple(leaf.shape):
        shown = "" if flax_value is None else f" (as Flax {flax_value.shape})"
        errors.append(
          f"checkpoint key {key} has shape {value.shape}{shown} but Flax "
          f"leaf {collection}/{'/'.join(map(str, path))} has shape "
          f"{tuple(leaf.shape)}"
        )
      else:
        filled[collection][path] = flax_value.astype(leaf.dtype)
  for key, (collection, path, leaf) in targets.items():
    if path in filled[collection] or missing == "keep":
      continue
    errors.append(
      f"Flax leaf {collection}/{'/'.join(map(str, path))} "
      f"{tuple(leaf.shape)} has no checkpoint value (expected key {key})"
    )
  weights.raise_if_errors(errors, "torchvision state dict")
  for what, n in sorted(skipped.items()):
    logging.info("torchvision checkpoint: ignored %d %s entries", n, what)
  out = []
  for collection, flat in trees.items():
    kept = [p for p in flat if p not in filled[collection]]
    if kept:
      logging.info(
        "torchvision checkpoint: %d %s leaves keep the model's values, e.g. %s",
        len(kept),
        collection,
        "/".join(map(str, kept[0])),
      )
    leaves = {p: filled[collection].get(p) for p in flat}
    for p in kept:
      leaves[p] = np.asarray(jax.device_get(flat[p]))
    out.append(_unflatten(leaves))
  return out[0], out[1]


def load(
  path: str | os.PathLike,
  model_or_config: "resnet.ResNet | Mapping[str, Any]",
  *,
  missing: str = "error",
) -> tuple[dict, dict]:
  """Reads a torchvision checkpoint and converts it (see `convert`).

  Args:
    path: `.pth` (zip or legacy `torch.save`) or `.safetensors`.
    model_or_config: the target model or `resnet.ResNet` keyword arguments.
    missing: see `convert`.

  Returns:
    (params, batch_stats) pure dicts for `nnx.merge`.
  """
  state_dict = weights.read_state_dict(path)
  logging.info("read %d tensors from %s", len(state_dict), path)
  return convert(state_dict, model_or_config, missing=missing)


def load_into(
  model: resnet.ResNet,
  path: str | os.PathLike,
  *,
  missing: str = "error",
) -> resnet.ResNet:
  """Loads a torchvision checkpoint into `model` in place and returns it."""
  params, stats = load(path, model, missing=missing)
  for var_type, values in ((nnx.Param, params), (nnx.BatchStat, stats)):
    state = nnx.state(model, var_type)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
  return model
