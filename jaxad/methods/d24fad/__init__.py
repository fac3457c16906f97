"""D²4FAD: dual distillation for few-shot anomaly detection (METHODS.md 2).

A frozen ImageNet Wide-ResNet-50-2 teacher encodes every image; its layer4
feeds a trained reverse decoder (de-WRN-50-2) whose three stages are
distilled from the teacher's layer1..3 on the query (TSD) and, through
learn-to-weight attention over K support images of the same dataset, from
the supports' decoded features (SSD): L = SSD + 0.1 TSD. Training runs on
episodes from several *source* datasets; the *target* is scored with its
own K-shot support set, an input (`score_context`), never a weight.

Modules: `episodes` (query/support draws on the device), `forward`
(per-slice BatchNorm, loss, scoring), `learn_to_weight`, `losses`;
`jaxad.models.reverse_decoder`, `jaxad.models.teacher`,
`jaxad.weights.d24fad` (the original's state dicts).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

from jaxad import config_checks
from jaxad.data import fewshot_sources
from jaxad.methods import api, updates
from jaxad.methods.d24fad import episodes, forward, teacher_cache
from jaxad.methods.d24fad.learn_to_weight import LearnToWeight
from jaxad.models import resnet, reverse_decoder, teacher

Array = jax.Array
SCORE = "d24fad"


def teacher_kwargs(config: mlc.ConfigDict) -> dict:
  """`resnet.ResNet` arguments of the frozen teacher (all 4 stages)."""
  m = config.model
  return dict(
    variant=m.variant,
    num_blocks=tuple(m.teacher_blocks) or None,
    stages=4,
    in_channels=3,
  )


def _decoder(config, key) -> reverse_decoder.ReverseDecoder:
  m = config.model
  return reverse_decoder.ReverseDecoder(
    num_blocks=tuple(m.decoder_blocks),
    width_per_group=m.width_per_group,
    rngs=nnx.Rngs(key),
  )


def optimizer(config: mlc.ConfigDict) -> optax.GradientTransformation:
  """Adam over the decoder and learn-to-weight (METHODS.md 2.5)."""
  o = config.optim
  return optax.adam(o.lr, b1=o.b1, b2=o.b2)


def to_input(images: Array) -> Array:
  """uint8 [B, S, S, C] -> float32 [B, S, S, 3] in [0, 1].

  ToTensor only: the original feeds [0, 1] RGB to the ImageNet teacher
  without its normalisation (METHODS.md 2.5); grayscale is repeated.
  """
  x = images.astype(jnp.float32) / 255.0
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _encode(model: api.Model, x: Array) -> dict[str, Array]:
  """The frozen teacher's layer1..4 features (eval-mode BN), no gradient."""
  feats = model.net("teacher")(x, train=False)
  return {k: jax.lax.stop_gradient(v) for k, v in feats.items()}


def _pool_layer4(model: api.Model, images: Array) -> Array:
  """The teacher's layer4 of uint8 pool images (split over `data`)."""
  return _encode(model, api.shard_batch(to_input(images)))["layer4"]


def train_step(state, inputs, local_step, *, tx, draw, bn_mode):
  """One episode: B queries with K supports each, one Adam step.

  Args:
    state: decoder + learn-to-weight (trained), teacher (frozen).
    inputs: {"pool": [N, S, S, C] uint8 resident training normals of every
      source, grouped by source; "pool_source" [N] int32; "start", "size"
      [S] int32 (`episodes.source_ranges`); "data_key", "noise_key"; with
      `model.teacher_cache`, "pool_layer4" [N, h, w, 2048] float32 (the
      teacher's layer4 of every pool image, `teacher_cache`)}.
    local_step: step within the phase (the only phase).
    draw: `episodes.draw` with its static arguments bound.

  Returns:
    The new state and {"loss", "ssd_loss", "tsd_loss", "l2_grads"}.
  """
  pool = inputs["pool"]
  queries, supports = draw(
    local_step,
    pool_source=inputs["pool_source"],
    start=inputs["start"],
    size=inputs["size"],
    data_key=inputs["data_key"],
    noise_key=inputs["noise_key"],
  )
  k, b = supports.shape
  if "pool_layer4" in inputs:  # teacher_cache: encode the queries only
    feats = _encode(state.model(), api.shard_batch(to_input(pool[queries])))
    e4_query = inputs["pool_layer4"][queries]  # (feats' layer4: unused)
    e4_support = inputs["pool_layer4"][supports]
  else:
    images = pool[jnp.concatenate([queries, supports.reshape(-1)])]
    feats = _encode(state.model(), api.shard_batch(to_input(images)))
    e4 = feats["layer4"]
    e4_query, e4_support = e4[:b], e4[b:].reshape(k, b, *e4.shape[1:])
  tsd_teacher = tuple(feats[f"layer{i}"][:b] for i in (1, 2, 3))
  loss_fn = functools.partial(
    forward.train_loss,
    batch_stats=state.batch_stats["decoder"],
    e4_query=e4_query,
    e4_support=e4_support,
    teacher=tsd_teacher,
    decoder_def=state.graphdefs["decoder"],
    l2w_def=state.graphdefs["l2w"],
    bn_mode=bn_mode,
  )
  # One Adam over decoder and learn-to-weight, as the original.
  trained = {"decoder": state.params["decoder"], "l2w": state.params["l2w"]}
  params, opt, loss, aux, gnorm = updates.minimize_step(
    loss_fn, trained, state.opt_state["student"], tx
  )
  state = state.replace(
    params=params,
    batch_stats={"decoder": aux["batch_stats"]},
    opt_state={"student": opt},
  )
  return state, {
    "loss": loss,
    "ssd_loss": aux["ssd"],
    "tsd_loss": aux["tsd"],
    "l2_grads": gnorm,
  }


class D24FAD(api.Defaults):
  """The D²4FAD method object (see jaxad/methods/api.py)."""

  @config_checks.config_errors
  def check_config(self, config: mlc.ConfigDict) -> None:
    """Refuses an impossible D²4FAD config before any data or compute.

    Raises:
      ConfigError: a shared check (`jaxad.config_checks`), no teacher
        weights, an unknown BN mode, a teacher without bottlenecks, block
        counts the networks refuse, an image size whose features the
        decoder cannot meet, not 3 channels, or a bad data.sources /
        data.target / shots / support (`fewshot_sources.check_config`), or
        a source root of the wrong kind.
      ConfigPathError: a teacher checkpoint or data.root that does not
        exist.
    """
    config_checks.check_shared(config, trains=True, method="D²4FAD")
    teacher.check_weights(
      config.model.teacher_weights,
      config.model.variant,
      method="D²4FAD",
      offline=" (or configs/d24fad.py:offline)",
    )
    m = config.model
    if m.bn_mode not in forward.BN_MODES:
      raise ValueError(
        f"config.model.bn_mode must be one of {list(forward.BN_MODES)}, "
        f"got {m.bn_mode!r}"
      )
    if resnet.VARIANTS.get(m.variant, ("",))[0] != "bottleneck":
      # The decoder mirrors a bottleneck ResNet's layer1..4 widths.
      raise config_checks.refuse(
        "model.variant",
        m.variant,
        "a bottleneck ResNet, one of"
        f" {[v for v, b in resnet.VARIANTS.items() if b[0] == 'bottleneck']}",
      )
    blocks = tuple(m.teacher_blocks)
    if blocks and (len(blocks) != 4 or min(blocks) < 1):
      raise config_checks.refuse(
        "model.teacher_blocks", blocks, "() or 4 stages of >= 1 block each"
      )
    blocks = tuple(m.decoder_blocks)
    if len(blocks) != 3 or min(blocks) < 1:
      raise config_checks.refuse(
        "model.decoder_blocks", blocks, "3 stages of >= 1 block each"
      )
    config_checks.check_int("model.width_per_group", m.width_per_group, 1)
    size = config.data.image_size
    # The stem halves S twice (ceil: conv and max-pool, padded) to layer1's
    # L1; layer2..4 halve again, and the decoder doubles layer4 three times
    # to meet layer3..1: exact only when L1 is a multiple of 8.
    if -(-size // 4) % 8:
      raise config_checks.refuse(
        "data.image_size",
        size,
        "ceil(image_size / 4) must be a multiple of 8, so that the decoder's"
        " three 2x upsamplings of layer4 meet the teacher's layer3..1 (e.g."
        " a multiple of 32: 64, 128, 224, 256)",
      )
    if config.data.channels != 3:
      raise ValueError(
        "config.data.channels must be 3: the teacher reads RGB, got "
        f"{config.data.channels}"
      )
    # Sources, target, shots: no decoding. Then each entry's root.
    entries, _ = fewshot_sources.check_config(config.data)
    for e in entries:
      if e.format in config_checks.LAYOUTS:
        config_checks.check_source(e.data, f"data.sources[{e.name!r}]")

  def check_scoring_data(self, config, trained) -> None:
    """Refuses a target the run trained on (one of its sources, METHODS.md
    §2.1: the target is an unseen dataset); `trained` is the run's
    flattened config. Another target the run never saw may be scored."""
    target = str(config.data.target)
    if not trained or target == trained.get("data.target"):
      return
    data = {
      k[len("data.") :]: v
      for k, v in trained.items()
      if k.startswith("data.") and k.count(".") == 1
    }
    try:
      entries, t = fewshot_sources.check_config(mlc.ConfigDict(data))
    except (ValueError, FileNotFoundError) as e:
      raise config_checks.ConfigError(
        f"config.data.target={target!r} differs from the run's, whose"
        f" training sources cannot be listed ({e}): nothing to check it"
        " against"
      ) from e
    sources = [e.name for i, e in enumerate(entries) if i != t]
    if target in sources:
      raise config_checks.ConfigError(
        f"config.data.target={target!r} was a training source of this run"
        f" (sources {sources}, target {entries[t].name!r}): scoring it is"
        " not few-shot on an unseen dataset. Train a run with it as the"
        " target (data.exclude_sources drops a source from training)"
      )

  def resumable_changes(self, stored) -> tuple[str, ...]:
    del stored
    return ("model.teacher_cache",)  # where layer4 comes from, not what

  def rescoring_changes(self) -> tuple[str, ...]:
    # The support set is an input of scoring, not a weight: another K or
    # support draw/folder re-scores a trained model (`jaxad.evaluate`).
    return ("data.shots", "data.support")

  def load_data(self, config: mlc.ConfigDict, workdir: str):
    from jaxad.data import fewshot  # tfds only when data is prepared

    return fewshot.load(config.data, workdir, config.eval.calibration_fraction)

  def synthetic_data(self, config: mlc.ConfigDict, num_images: int):
    """Seeded random few-shot data: 2 sources of num_images / 2 training
    normals each, K supports, num_images test images [S, S, 3] uint8 and
    max(1, num_images // 10) calibration normals."""
    from jaxad.data import fewshot

    rng = np.random.default_rng(0)
    size, k = config.data.image_size, config.data.shots

    def images(n):
      return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    half = max(num_images // 2, 2)
    pools, support, test = images(2 * half), images(k), images(num_images)
    num_calibration = max(1, num_images // 10)
    return fewshot.FewShotData(
      name="synthetic",
      pools=pools,
      pool_source=np.repeat(np.arange(2, dtype=np.int32), half),
      source_names=("synthetic0", "synthetic1"),
      support=support,
      support_names=tuple(f"support/{i}" for i in range(k)),
      support_from="synthetic",
      test=test,
      test_labels=np.arange(num_images, dtype=np.int32) % 2,
      test_names=tuple(f"synthetic/{i}" for i in range(num_images)),
      calibration=images(num_calibration),
      calibration_names=tuple(
        f"synthetic/calibration/{i}" for i in range(num_calibration)
      ),
    )

  def init_state(self, config: mlc.ConfigDict) -> api.TrainState:
    root = jax.random.key(config.seed)
    tx = optimizer(config)

    @jax.jit
    def init_trained(key):
      k_dec, k_l2w = jax.random.split(key)
      dec, stats, _ = updates.init_net(_decoder(config, k_dec), None)
      l2w, _, _ = updates.init_net(LearnToWeight(rngs=nnx.Rngs(k_l2w)), None)
      params = {"decoder": dec, "l2w": l2w}
      return params, stats, tx.init(params)

    params, stats, opt = init_trained(jax.random.fold_in(root, 0))
    kw = teacher_kwargs(config)
    frozen = teacher.load_teacher(
      kw,
      config.model.teacher_weights,
      jax.random.fold_in(root, 1),
      method="D²4FAD",
    )
    return api.new_state(
      params=params,
      batch_stats={"decoder": stats},
      opt_state={"student": opt},  # decoder + l2w: one Adam
      frozen={"teacher": {"params": frozen[0], "batch_stats": frozen[1]}},
      graphdefs={
        "teacher": teacher.graphdef(kw),
        "decoder": nnx.graphdef(nnx.eval_shape(lambda: _decoder(config, 0))),
        "l2w": nnx.graphdef(
          nnx.eval_shape(lambda: LearnToWeight(rngs=nnx.Rngs(0)))
        ),
      },
    )

  def phases(self, config: mlc.ConfigDict, data) -> list[api.Phase]:
    b, k = config.train.batch_size, config.data.shots
    api.check_batches(
      len(data.pools),
      b,
      what="training pools (see data.max_source_images)",
      key="train.batch_size",
    )
    start, size = episodes.source_ranges(data.pool_source)
    draw = functools.partial(
      episodes.draw,
      batch_size=b,
      shots=k,
      resample=config.data.resample_supports,
    )
    step = functools.partial(
      train_step,
      tx=optimizer(config),
      draw=draw,
      bn_mode=config.model.bn_mode,
    )
    derive = None
    if config.model.teacher_cache:
      # A step's batch before the cache; a smaller pool: B (>= B).
      chunk = b * (k + 1) if len(data.pools) >= b * (k + 1) else b
      derive = teacher_cache.derive(_pool_layer4, chunk=chunk)
    return [
      api.Phase(
        "d24fad",
        config.epochs * (len(data.pools) // b),
        step,
        batch_size=b,
        batch_key="train.batch_size",
        inputs={
          "pool": data.pools,
          "pool_source": data.pool_source,
          "start": start,
          "size": size,
          **updates.step_keys(config.seed, 1000),
        },
        derive=derive,
      )
    ]

  def scores(self, config: mlc.ConfigDict) -> tuple[api.Score, ...]:
    del config
    return (
      api.Score(
        SCORE,
        "3-scale channel cosine distance of the query's decoded features "
        "to its learn-to-weight support features, Gaussian-smoothed "
        "(sigma 4); image score: max of the map",
      ),
    )

  def score_context(self, config, model: api.Model, data):
    """The K supports' decoded features (eval mode), once per evaluation;
    another `data.shots` or support draw re-scores without retraining."""
    del config

    # No block_barrier options: this runs once per evaluation and may be
    # traced inside another jit (nested jits refuse compiler options).
    @jax.jit
    def features(model, support):
      e4 = _encode(model, to_input(support))["layer4"]
      return forward.support_features(
        model.params,
        model.batch_stats["decoder"],
        e4,
        decoder_def=model.graphdefs["decoder"],
      )

    return features(model, jnp.asarray(data.support))

  def score(self, config, model: api.Model, context, images):
    """Scores uint8 [B, S, S, C] queries against the support features.

    Returns:
      {"scores": {"d24fad": [B]}, "maps": {"d24fad": [B, S, S]}}.
    """
    out = forward.score_queries(
      model.params,
      model.batch_stats["decoder"],
      _encode(model, to_input(images))["layer4"],
      context,
      decoder_def=model.graphdefs["decoder"],
      l2w_def=model.graphdefs["l2w"],
      size=images.shape[1],
      sigma=config.score.sigma,
    )
    return {
      "scores": {SCORE: out["image_score"]},
      "maps": {SCORE: out["smoothed"]},
    }


METHOD = D24FAD()
