"""OpenAI-layout CLIP state dicts (CheXzero, OpenAI's ViTs) -> `models.clip`.

Source of the key layout: OpenAI's `clip/model.py` (`CLIP`, `build_model`);
CheXzero's `best_64_0.0001_original_35000_0.864.pt` is such a state dict
(METHODS.md 3.2). The architecture is inferred from the keys and shapes as
`build_model` does (`config_from_state_dict`). Per key:

* `*.attn.in_proj_weight` [3W, W] / `in_proj_bias` [3W] -> the q, k, v rows
  in that order -> `attn/{q,k,v}_proj/kernel` [W, W] (transposed) / `bias`;
* `*.attn.out_proj.*`, `*.mlp.c_fc.*`, `*.mlp.c_proj.*` (nn.Linear) ->
  `kernel` [in, out] (transposed) and `bias`;
* `visual.conv1.weight` [O, I, kh, kw] -> `visual/conv1/kernel` [kh, kw, I, O];
* `*.ln_*.weight` / `ln_final.weight` -> `scale`, their `.bias` -> `bias`;
* `token_embedding.weight` -> `token_embedding/embedding`;
* `visual.class_embedding`, `visual.positional_embedding`, `visual.proj`,
  `positional_embedding`, `text_projection`, `logit_scale` as they are
  (they are used as `x @ proj` in torch too).

A "module." prefix (nn.DataParallel) is stripped, a {"state_dict": ...}
wrapper unwrapped (`weights.read_state_dict`), and the non-tensor entries
`input_resolution`, `context_length`, `vocab_size` ignored, as
`build_model` deletes them. Anything else is strict: an unexpected key, a
missing one or a shape that does not fit raises a ValueError naming it.
Values become float32 (CheXzero may store fp16).

TorchScript archives (OpenAI's released `ViT-B-32.pt` is one) are not read
without torch: `load` says so and how to turn one into a state dict.

  config, params = clip.load("best_64_0.0001_original_35000_0.864.pt")
  model = models.clip.from_params(config, params, compute_dtype="bfloat16")
"""

import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np
from flax import nnx, traverse_util

from jaxad import weights
from jaxad.models import clip as clip_model

# Entries OpenAI's build_model deletes before load_state_dict.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
# What OpenAI's `convert_weights` casts to fp16 inside `build_model`: conv
# and linear weights and biases, attention in/out projections, `proj` and
# `text_projection` (not LayerNorms, embeddings or logit_scale).
_FP16_IN_BUILD_MODEL = re.compile(
  r"(in_proj_(weight|bias)|out_proj\.(weight|bias)|c_fc\.(weight|bias)"
  r"|c_proj\.(weight|bias)|conv1\.weight)$|^(visual\.proj|text_projection)$"
)


def _block_count(state_dict: Mapping, prefix: str) -> int:
  """Distinct N of `{prefix}N.` keys (OpenAI counts in_proj_weight keys for
  the ViT and distinct N for the text tower; equal on a valid checkpoint)."""
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  return len({m[1] for k in state_dict if (m := pat.match(k))})


def config_from_state_dict(
  state_dict: Mapping[str, np.ndarray],
) -> clip_model.CLIPConfig:
  """The architecture of an OpenAI-layout CLIP state dict, as `build_model`.

  Args:
    state_dict: {OpenAI key: array} (only shapes are read); a "module."
      prefix is ignored.

  Returns:
    The config: vision_width = conv1 out channels, patch = its kernel size,
    grid = sqrt(positional rows - 1), resolution = patch * grid, embed_dim =
    text_projection columns, context / vocab / width from the text
    embeddings and ln_final, heads = width // 64, layers = blocks counted.

  Raises:
    ValueError: not a ViT CLIP (no `visual.proj`: OpenAI's ResNet towers are
      unsupported) or a key the inference needs is absent.
  """
  state_dict = _strip(state_dict)
  need = (
    "visual.proj",
    "visual.conv1.weight",
    "visual.positional_embedding",
    "text_projection",
    "positional_embedding",
    "token_embedding.weight",
    "ln_final.weight",
  )
  if "visual.proj" not in state_dict:
    raise ValueError(
      "not a ViT CLIP state dict: no key visual.proj (OpenAI's ModifiedResNet "
      "image towers, RN50 etc., are not supported)"
    )
  missing = [k for k in need if k not in state_dict]
  if missing:
    raise ValueError(f"CLIP state dict lacks the keys {missing}")

  def shape(k):
    return tuple(np.shape(state_dict[k]))

  conv = shape("visual.conv1.weight")
  grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
  width = shape("ln_final.weight")[0]
  return clip_model.CLIPConfig(
    embed_dim=shape("text_projection")[1],
    image_resolution=conv[-1] * grid,
    vision_layers=_block_count(state_dict, "visual.transformer.resblocks."),
    vision_width=conv[0],
    vision_patch_size=conv[-1],
    context_length=shape("positional_embedding")[0],
    vocab_size=shape("token_embedding.weight")[0],
    transformer_width=width,
    transformer_heads=width // 64,
    transformer_layers=_block_count(state_dict, "transformer.resblocks."),
  )


def _target(path: tuple, shape: tuple):
  """(torch key, torch shape, torch value -> Flax value) of one Flax leaf."""
  mods, leaf = [str(p) for p in path[:-1]], str(path[-1])
  if mods and mods[-1] in _QKV:  # a third of the packed in_proj
    i, w = _QKV[mods[-1]], shape[-1]
    if leaf == "kernel":
      return (
        ".".join(mods[:-1] + ["in_proj_weight"]),
        (3 * w, shape[0]),
        lambda v: v[i * w : (i + 1) * w].T,
      )
    return (
      ".".join(mods[:-1] + ["in_proj_bias"]),
      (3 * w,),
      lambda v: v[i * w : (i + 1) * w],
    )
  if leaf == "kernel" and len(shape) == 4:  # conv: OIHW -> HWIO
    kh, kw, ci, co = shape
    return (
      ".".join(mods + ["weight"]),
      (co, ci, kh, kw),
      lambda v: v.transpose(2, 3, 1, 0),
    )
  if leaf == "kernel":  # nn.Linear: [out, in] -> [in, out]
    return ".".join(mods + ["weight"]), shape[::-1], lambda v: v.T
  name = {"scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join(mods + [name]), shape, lambda v: v


def _strip(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
    k.removeprefix("module."): v
    for k, v in state_dict.items()
    if k.removeprefix("module.") not in IGNORED_KEYS
  }


def convert(
  state_dict: Mapping[str, np.ndarray],
  config: "clip_model.CLIPConfig | None" = None,
  *,
  fp16_round: bool = False,
) -> tuple["clip_model.CLIPConfig", dict]:
  """Maps an OpenAI-layout CLIP state dict onto `models.clip.CLIP`.

  Args:
    state_dict: {OpenAI key: array}, e.g. from `weights.read_state_dict`.
    config: the expected architecture; inferred from the state dict (as
      OpenAI's `build_model`) when None.
    fp16_round: round the values OpenAI's `build_model` casts to fp16
      (`convert_weights`: conv, linear and attention projections, `proj`,
      `text_projection`) to fp16 and back, so that a float32 model holds
      exactly the weights code built on `build_model` (PPAD, CheXzero)
      computes with; float32 checkpoints differ from them by ~5e-4
      relative otherwise, which moves logits by ~1e-3.

  Returns:
    (config, params): params is a pure dict in the layout of
    `nnx.state(CLIP(config), nnx.Param).to_pure_dict()`, float32 host numpy
    arrays; `models.clip.from_params(config, params)` builds the model.

  Raises:
    ValueError: not a ViT CLIP, a key the config inference needs is absent,
      or (listing each key with its shapes) a checkpoint key that no
      parameter takes, a shape mismatch, or a parameter without a key.
  """
  sd = _strip(state_dict)
  if config is None:
    config = config_from_state_dict(sd)
  model = nnx.eval_shape(lambda: clip_model.CLIP(config, rngs=nnx.Rngs(0)))
  flat = traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())
  targets = {}  # torch key -> (torch shape, [(Flax path, leaf, fn)])
  for path, leaf in flat.items():
    key, shape, fn = _target(path, tuple(leaf.shape))
    targets.setdefault(key, (shape, []))[1].append((path, leaf, fn))
  filled, errors = {}, []
  for key, value in sd.items():
    value = np.asarray(value)
    if key not in targets:
      errors.append(
        f"checkpoint key {key} {value.shape}: no parameter of this CLIP "
        "corresponds to it"
      )
      continue
    shape, leaves = targets[key]
    if value.shape != shape:
      flax = ", ".join("/".join(map(str, p)) for p, _, _ in leaves)
      errors.append(
        f"checkpoint key {key} has shape {value.shape}, the model expects "
        f"{shape} (Flax {flax})"
      )
      continue
    if fp16_round and _FP16_IN_BUILD_MODEL.search(key):
      value = value.astype(np.float16)
    for path, leaf, fn in leaves:
      filled[path] = np.array(fn(value), dtype=leaf.dtype, order="C")
  for key, (shape, leaves) in targets.items():
    if key not in sd:
      errors.append(
        f"checkpoint key {key} {shape} is missing (Flax "
        f"{'/'.join(map(str, leaves[0][0]))})"
      )
  weights.raise_if_errors(errors, "CLIP state dict")
  return config, traverse_util.unflatten_dict(filled)


def _check_not_torchscript(path: str) -> None:
  if not zipfile.is_zipfile(path):
    return
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
  if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
    raise ValueError(
      f"{path} is a TorchScript (torch.jit) archive, such as OpenAI's "
      "released ViT-B-32.pt; only plain state dicts are read without torch. "
      "Convert it once where torch is installed: torch.save(torch.jit.load("
      f"'{os.path.basename(path)}', map_location='cpu').state_dict(), "
      "'clip_state_dict.pt')"
    )


def load(
  path: str | os.PathLike,
  config: "clip_model.CLIPConfig | None" = None,
  *,
  fp16_round: bool = False,
) -> tuple["clip_model.CLIPConfig", dict]:
  """Reads an OpenAI-layout CLIP checkpoint and converts it (`convert`).

  Args:
    path: a `torch.save` file (zip or legacy) of the state dict, e.g.
      CheXzero's `.pt`, or a `.safetensors` file.
    config, fp16_round: as `convert`.

  Returns:
    (config, params) as `convert`.

  Raises:
    ValueError: a TorchScript archive, an unreadable file, or as `convert`.
  """
  path = os.fspath(path)
  _check_not_torchscript(path)
  return convert(weights.read_state_dict(path), config, fp16_round=fp16_round)


def load_model(
  path: str | os.PathLike,
  *,
  compute_dtype: str = "float32",
  fp16_round: bool = False,
) -> clip_model.CLIP:
  """`load`, then `models.clip.from_params` with `compute_dtype`."""
  config, params = load(path, fp16_round=fp16_round)
  return clip_model.from_params(config, params, compute_dtype=compute_dtype)
