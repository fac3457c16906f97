"""DDAD-ASR (Cai et al., MedIA 2023), METHODS.md 1, on the method contract.

Two ensembles of K reconstruction AEs (NDM on known normals, UDM on known
normals + the unlabeled pool; `ensembles.py`) give the rec / intra / inter
discrepancy maps; the optional refinement stage (`refine.py`) trains an
ASR-Net on them. Phases: "ensembles" (both modules), "udm_tail" (the UDM's
extra steps: its set is larger), then "refine" when enabled.
"""

import functools

import jax
import ml_collections as mlc
import numpy as np

from jaxad import config_checks
from jaxad.data import resident
from jaxad.methods import api
from jaxad.methods.ddad import ensembles, refine
from jaxad.models import autoencoder, layers

_DESCRIPTIONS = {
  "rec": "ensemble reconstruction error (NDM mean); image score: spatial mean",
  "intra": "std of the NDM members' reconstructions; image score: spatial mean",
  "inter": "|UDM mean - NDM mean| reconstruction; image score: spatial mean",
  "r_dual": "ASR-Net P(anomalous) from [inter, intra]; image score: "
  "spatial mean",
  "r_intra": "ASR-Net P(anomalous) from intra; image score: spatial mean",
}


class DDAD(api.Defaults):
  """The DDAD-ASR method object (see jaxad/methods/api.py)."""

  @config_checks.config_errors
  def check_config(self, config: mlc.ConfigDict) -> None:
    """Refuses an impossible DDAD config before any data or compute.

    Raises:
      ConfigError: a shared check (`jaxad.config_checks`), fewer than 2
        members, members not divisible by `mesh.member`, an image size the
        AE cannot take, an unknown backbone, upsampling, dtype or member
        strategy, a layer width below 1, a
        refinement stage that trains no epoch or has unknown inputs, or an
        anomaly rate the embedded set's fixed pool does not have.
    """
    config_checks.check_shared(config, trains=True, method="DDAD")
    config_checks.check_embedded_pool(config)
    ensembles.check_members(config)  # K over the mesh's member axis
    m = config.model
    if m.num_members < 2:
      # The intra-discrepancy map is the members' unbiased std (ddof=1).
      raise config_checks.refuse(
        "model.num_members",
        m.num_members,
        "DDAD's intra-discrepancy needs K >= 2 members (the std over the"
        " NDM's members)",
      )
    size = config.data.image_size
    if size % 16:
      raise config_checks.refuse(
        "data.image_size",
        size,
        "must be a multiple of 16: DDAD's AE halves it 4 times (e.g. 32, 64,"
        " 128)",
      )
    if m.backbone not in autoencoder.BACKBONES:
      raise config_checks.refuse(
        "model.backbone", m.backbone, f"one of {list(autoencoder.BACKBONES)}"
      )
    if m.upsample not in ("subpixel", "direct"):
      raise config_checks.refuse(
        "model.upsample", m.upsample, "one of ['subpixel', 'direct']"
      )
    config_checks.check_int("model.latent_size", m.latent_size, 1)
    # The AE's narrowest layer has int(16 * width) channels.
    if not m.width > 0 or int(16 * m.width) < 1:
      raise config_checks.refuse(
        "model.width",
        m.width,
        "must be >= 1/16 (the narrowest layer has int(16 * width) channels)",
      )
    if m.backbone == "memae":
      config_checks.check_int("model.memory_slots", m.memory_slots, 1)
    layers.compute_dtype(m.compute_dtype)
    ensembles.member_strategy(config)
    if config.refine.enabled:
      refine.score_name(config)
      config_checks.check_int(
        "refine.epochs",
        config.refine.epochs,
        1,
        " with refine.enabled=True (or turn the stage off)",
      )

  def resumable_changes(self, stored: dict) -> tuple[str, ...]:
    # A refinement stage may be added to a run trained without one.
    return () if stored.get("refine.enabled", False) else ("refine.",)

  def init_state(self, config: mlc.ConfigDict) -> api.TrainState:
    params, stats, opt, graphdef = ensembles.init(config)
    graphdefs = {m: graphdef for m in ensembles.MODULES}
    if config.refine.enabled:
      key = jax.random.fold_in(
        jax.random.key(config.seed), len(ensembles.MODULES)
      )
      params["asr"], stats["asr"], opt["asr"] = jax.jit(
        functools.partial(refine.init, config)
      )(key)
      graphdefs["asr"] = refine.graphdef(config)
    return api.new_state(
      params=params, batch_stats=stats, opt_state=opt, graphdefs=graphdefs
    )

  def phases(self, config: mlc.ConfigDict, data) -> list[api.Phase]:
    b = config.train.batch_size
    num = {
      "ndm": len(data.normal),
      "udm": len(data.normal) + len(data.unlabeled),
    }
    api.check_batches(
      num["ndm"], b, what=f"{data.name}: known normals", key="train.batch_size"
    )
    images = np.concatenate([data.normal, data.unlabeled])
    phases = ensembles.phases(config, images, num)
    if config.refine.enabled:
      maps_fn = functools.partial(ensembles.ensemble_maps, config=config)
      phases.append(refine.phase(config, images, num["ndm"], maps_fn))
    return phases

  def scores(self, config: mlc.ConfigDict) -> tuple[api.Score, ...]:
    names = ["rec", "intra", "inter"]
    if config.refine.enabled:
      names.append(refine.score_name(config))
    return tuple(api.Score(n, _DESCRIPTIONS[n]) for n in names)

  def score(self, config, model: api.Model, context, images):
    """Scores uint8 [B, S, S, 1] images with the frozen ensembles (eval BN).

    Returns:
      {"scores": {name: [B]}, "maps": {name: [B, S, S]}}, names rec, intra,
      inter (+ r_dual or r_intra with the refinement stage); image score =
      spatial mean of the map.
    """
    del context
    maps = ensembles.ensemble_maps(
      model, resident.to_unit_range(images), config=config
    )
    if config.refine.enabled:
      maps[refine.score_name(config)] = refine.anomaly_probability(
        model.net("asr"), maps, config.refine.inputs
      )
    return {
      "scores": {k: v.mean(axis=(1, 2)) for k, v in maps.items()},
      "maps": maps,
    }


METHOD = DDAD()
