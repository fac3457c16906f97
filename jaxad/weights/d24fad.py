"""The original D²4FAD's state dicts -> `ReverseDecoder` / `LearnToWeight`.

Source of the key layout: the original's `de_resnet.py` and
`learn_to_weight.py` (ttttqz/D24FAD @42425f1); see the golden files
`d24fad_decoder_1block_random.safetensors` and `d24fad_l2w_random.safetensors`.
The Flax trees mirror the torch module names, so the map is per leaf:

* `layerS.B.convK.weight` [O, I, kh, kw] -> params `layerS/B/convK/kernel`
  [kh, kw, I, O] (1x1 and 3x3 convs);
* `layerS.0.conv2.weight` and `layerS.0.upsample.0.weight`, the 2x2
  stride-2 transposed convs, [I, O, kh, kw] -> `.../conv2/kernel` and
  `.../upsample/deconv/kernel` [kh, kw, I, O];
* `*.bnK.{weight,bias}` and `layerS.0.upsample.1.{weight,bias}` -> params
  `.../scale`, `.../bias`; their `running_mean` / `running_var` ->
  batch_stats `.../mean`, `.../var`;
* `proj_in{s}.weight` [C, C, 1, 1] / `.bias` -> params `proj_in{s}/kernel`
  [1, 1, C, C] / `proj_in{s}/bias`.

`*.num_batches_tracked` is skipped and a `module.` prefix (the original
wraps its models in `nn.DataParallel` on several GPUs) is stripped.
Anything else is strict: an unmapped or mis-shaped key, or a Flax leaf
without a value, raises a ValueError naming the key and both shapes.

The original saves both models in one file, `{'decoder': ..., 'weight':
...}`: pass each sub-dict (`jaxad.weights.read_state_dict` reads flat
state dicts only).
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from jaxad import weights
from jaxad.methods.d24fad import learn_to_weight
from jaxad.models import layers, reverse_decoder

# BatchNorm leaves: Flax name -> torch name.
_BN = {
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def _model(model_or_config, cls):
  if isinstance(model_or_config, cls):
    return model_or_config
  if isinstance(model_or_config, Mapping):
    config = dict(model_or_config)
    return nnx.eval_shape(lambda: cls(**config, rngs=nnx.Rngs(0)))
  raise TypeError(
    f"model_or_config must be a {cls.__name__} or a dict of its keyword "
    f"arguments, got {type(model_or_config).__name__}"
  )


def _torch_key(mods: tuple, leaf: str, bn: bool) -> str:
  mods = [str(m) for m in mods]
  if len(mods) >= 2 and mods[-2] == "upsample":  # nn.Sequential(deconv, bn)
    mods[-1] = {"deconv": "0", "bn": "1"}[mods[-1]]
  name = _BN[leaf] if bn else {"kernel": "weight", "bias": "bias"}[leaf]
  return ".".join(mods + [name])


def _to_flax(value: np.ndarray, transposed: bool) -> np.ndarray:
  if value.ndim != 4:
    return value
  # ConvTranspose2d stores [I, O, kh, kw], Conv2d [O, I, kh, kw].
  return (
    value.transpose(2, 3, 0, 1) if transposed else value.transpose(2, 3, 1, 0)
  )


def _convert(state_dict, model, what: str) -> tuple[dict, dict]:
  """(params, batch_stats) pure dicts of `model` from a torch state dict."""
  modules = dict(nnx.iter_graph(model))
  trees = {
    "params": nnx.state(model, nnx.Param).to_pure_dict(),
    "batch_stats": nnx.state(model, nnx.BatchStat).to_pure_dict(),
  }
  targets = {}  # torch key -> (collection, Flax path, leaf)
  for collection, tree in trees.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      module = modules[path[:-1]]
      bn = isinstance(module, layers.BatchNorm)
      transposed = isinstance(module, reverse_decoder.ConvTranspose2x2)
      key = _torch_key(path[:-1], path[-1], bn)
      targets[key] = (collection, path, leaf, transposed)
  filled = {c: {} for c in trees}
  errors = []
  for key, value in state_dict.items():
    key = key.removeprefix("module.")
    value = np.asarray(value)
    if key.endswith(".num_batches_tracked"):
      continue
    if key not in targets:
      errors.append(
        f"checkpoint key {key} {value.shape}: no Flax leaf of this {what} "
        "corresponds to it"
      )
      continue
    collection, path, leaf, transposed = targets[key]
    flax_value = _to_flax(value, transposed)
    flax_path = "/".join(map(str, path))
    if flax_value.shape != tuple(leaf.shape):
      errors.append(
        f"checkpoint key {key} has shape {value.shape} (as Flax "
        f"{flax_value.shape}) but Flax leaf {collection}/{flax_path} has "
        f"shape {tuple(leaf.shape)}"
      )
    else:
      # float16-stored checkpoints (the golden files) become float32.
      filled[collection][path] = flax_value.astype(leaf.dtype)
  for key, (collection, path, leaf, _) in targets.items():
    if path not in filled[collection]:
      errors.append(
        f"Flax leaf {collection}/{'/'.join(map(str, path))} "
        f"{tuple(leaf.shape)} has no checkpoint value (expected key {key})"
      )
  weights.raise_if_errors(errors, f"D²4FAD {what} state dict")
  return tuple(
    traverse_util.unflatten_dict(filled[c]) if filled[c] else {} for c in trees
  )


def convert_decoder(
  state_dict: Mapping[str, np.ndarray],
  model_or_config: "reverse_decoder.ReverseDecoder | Mapping[str, Any]",
) -> tuple[dict, dict]:
  """Maps the original's decoder state dict onto a `ReverseDecoder`.

  Args:
    state_dict: {torch key: array}, e.g. from `weights.read_state_dict`.
    model_or_config: the target model, or its keyword arguments (built
      abstractly, no compute), e.g. {"num_blocks": (1, 1, 1)}.

  Returns:
    (params, batch_stats) pure dicts in the layout of
    `nnx.state(model, nnx.Param / nnx.BatchStat).to_pure_dict()`, host
    arrays of the leaves' dtypes (float32); `nnx.merge(graphdef, params,
    batch_stats)` rebuilds the model.

  Raises:
    ValueError: an unmapped key, a shape mismatch or a leaf without a value,
      each listed with the key and both shapes.
  """
  model = _model(model_or_config, reverse_decoder.ReverseDecoder)
  return _convert(state_dict, model, "decoder")


def convert_l2w(
  state_dict: Mapping[str, np.ndarray],
  model_or_config: "learn_to_weight.LearnToWeight | Mapping | None" = None,
) -> dict:
  """Maps the original's `Learn_to_weight` state dict onto `LearnToWeight`.

  Args:
    state_dict: {"proj_in{1,2,3}.{weight,bias}": array}.
    model_or_config: the target model or its keyword arguments (default:
      the WRN-50-2 widths).

  Returns:
    The params pure dict (float32).

  Raises:
    ValueError: as `convert_decoder`.
  """
  model = _model(
    {} if model_or_config is None else model_or_config,
    learn_to_weight.LearnToWeight,
  )
  return _convert(state_dict, model, "learn-to-weight")[0]


def load_decoder(path: str | os.PathLike, model_or_config) -> tuple[dict, dict]:
  """Reads a decoder state dict file and converts it (`convert_decoder`)."""
  return convert_decoder(weights.read_state_dict(path), model_or_config)


def load_l2w(path: str | os.PathLike, model_or_config=None) -> dict:
  """Reads a learn-to-weight state dict file and converts it."""
  return convert_l2w(weights.read_state_dict(path), model_or_config)
