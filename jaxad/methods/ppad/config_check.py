"""PPAD's config check (`Method.check_config`): before any data or compute.

Besides the shared checks (`jaxad.config_checks`): the mode, the frozen
CLIP (a file that exists, or "random" with a known architecture), the
prompts file, the class names, one channel, at least one batch of shots,
and an image size equal to the CLIP's input size (its positional
embedding is fixed).
"""

import os

import ml_collections as mlc

from jaxad import config_checks
from jaxad.methods.ppad import frozen_clip
from jaxad.models import clip as clip_model

MODES = ("ppad", "zero_shot")


def clip_resolution(config: mlc.ConfigDict) -> int | None:
  """The frozen CLIP's input size in pixels.

  The architecture's for "random"; else read from the checkpoint through
  `frozen_clip.load_clip`, the cached load `init_state` makes anyway (so it
  costs the run nothing). None for a file that is not a readable CLIP:
  `init_state` refuses it, naming the file.
  """
  m = config.model
  if m.clip_weights == frozen_clip.RANDOM:
    return clip_model.ARCHITECTURES[m.clip_arch].image_resolution
  try:
    clip_config, _ = frozen_clip.load_clip(
      m.clip_weights,
      bool(m.clip_fp16_round),
      m.clip_arch,
      int(config.seed),
    )
  except (ValueError, OSError, KeyError):
    return None
  return clip_config.image_resolution


@config_checks.config_errors
def check(config: mlc.ConfigDict, *, trains: bool) -> None:
  """Refuses an impossible PPAD config; reads no data.

  Args:
    config: the run's config.
    trains: PPAD's `trains(config)` (False for zero-shot or imported
      prompts).

  Raises:
    ConfigError: a shared check, an unknown mode, CLIP architecture or
      dtype, no CLIP, prompts with zero-shot, not 2 class names, not 1
      channel, fewer shots than a batch, or an image size that is not the
      CLIP's input size.
    ConfigPathError: a CLIP or prompt file that does not exist.
  """
  config_checks.check_shared(config, trains=trains, method="PPAD")
  m = config.model
  if m.mode not in MODES:
    raise ValueError(f"config.model.mode={m.mode!r}; valid: {MODES}")
  if not m.clip_weights:
    raise ValueError(
      "config.model.clip_weights is empty: PPAD needs a frozen CLIP,"
      f" {frozen_clip.CHEXZERO}"
    )
  if (
    m.clip_weights == frozen_clip.RANDOM
    and m.clip_arch not in clip_model.ARCHITECTURES
  ):
    raise ValueError(
      f"config.model.clip_arch={m.clip_arch!r}; valid:"
      f" {list(clip_model.ARCHITECTURES)}"
    )
  for key in ("clip_weights", "prompts_checkpoint"):
    path = m[key]
    if path and path != frozen_clip.RANDOM and not os.path.isfile(path):
      raise FileNotFoundError(f"config.model.{key}: no file {path}")
  if m.mode == "zero_shot" and m.prompts_checkpoint:
    raise ValueError(
      "config.model.prompts_checkpoint is for mode=ppad; the zero-shot"
      " baseline uses no prompts"
    )
  if len(m.classnames) != 2:
    raise ValueError(
      f"config.model.classnames={tuple(m.classnames)}: (normal, abnormal)"
    )
  clip_model._dtype(m.compute_dtype)  # raises on a bad dtype
  if config.data.channels != 1:
    raise ValueError(
      f"config.data.channels={config.data.channels}: PPAD reads grayscale"
      " chest X-rays (SAS works on one channel) and stacks them to RGB"
    )
  if trains and config.data.shots < config.train.batch_size:
    raise ValueError(
      f"config.data.shots={config.data.shots} is fewer than one batch"
      f" (config.train.batch_size={config.train.batch_size})"
    )
  resolution = clip_resolution(config)
  if resolution is not None and config.data.image_size != resolution:
    clip = m.clip_weights
    if clip == frozen_clip.RANDOM:
      clip = f"random {m.clip_arch}"
    raise config_checks.refuse(
      "data.image_size",
      config.data.image_size,
      f"this CLIP ({clip}) takes {resolution} px images (its positional"
      f" embedding is fixed): set {resolution}",
    )
