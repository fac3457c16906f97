"""PPAD (position-guided prompt learning on a frozen medical CLIP; METHODS.md
3), on the method contract (jaxad/methods/api.py).

Only two arrays are trained (`prompts.Prompts`): 16 text context vectors
shared by both classes and one image prompt per patch, which replaces the
patch tokens outside a lung region. Each training image (one of K seeded
normal shots) gets a random region of the five, and with probability 0.5 a
SAS lesion in it (`sas.py`, label "pneumonia"); the loss is BCE-with-logits
over the two logits (normal, pneumonia) of its region's prompts. At test
time all five regions are scored, softmax per region, and the abnormal
probabilities fused (max if above 0.8, else the mean).

The frozen CLIP (`model.clip_weights`, OpenAI key layout, e.g. CheXzero's
checkpoint) lives in the state's `frozen` field: never differentiated,
updated or checkpointed. `model.mode="zero_shot"` scores CheXzero's
zero-shot baseline ("normal." vs "pneumonia.", no prompts); it and
`model.prompts_checkpoint` (a released PPAD prompt file) train nothing
(`trains` is False): `jaxad.evaluate` scores them without a checkpoint.

Deviations, stated: trainable prompts in float32 and the frozen towers in
`model.compute_dtype` (the original runs everything in fp16, §3.10 bug 2);
the 10 distinct prompts' text features once per step (the original runs
the text tower per sample: the same maths); images are resized by the data
layer (bilinear) instead of the original's bicubic Resize + CenterCrop;
the K shots are a seeded draw (the original's is unseeded, bug 8).
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

from jaxad import storage
from jaxad.data import oneclass
from jaxad.methods import api, updates
from jaxad.methods.ppad import config_check, frozen_clip, prompts, sas
from jaxad.models import clip_tokenizer

MODES = config_check.MODES


@dataclasses.dataclass(frozen=True)
class PPADData:
  """One-class data plus the K training shots (api.EvalData fields)."""

  name: str
  shots: np.ndarray  # [K, S, S, 1] uint8 normal training shots
  test: np.ndarray
  test_labels: np.ndarray
  test_names: tuple[str, ...]
  test_masks: np.ndarray | None = None
  # [NC, S, S, 1] uint8 known normals that are not shots, held out for the
  # decision threshold; None (no calibration) becomes [0, S, S, 1].
  calibration: np.ndarray | None = None
  calibration_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.calibration is None:
      empty = oneclass.no_calibration(self.test)
      object.__setattr__(self, "calibration", empty)


def _steps_per_epoch(config) -> int:
  return int(config.data.shots) // int(config.train.batch_size)


def optimizer(config, num_steps: int) -> optax.GradientTransformation:
  """SGD(lr, momentum 0.9) with a cosine decay to 0 over the run, stepped
  every iteration (the original's CosineAnnealingLR(T_max=100), stepped
  per iteration over 100 one-step epochs)."""
  schedule = optax.cosine_decay_schedule(
    config.optim.lr, decay_steps=max(num_steps, 1)
  )
  return optax.sgd(schedule, momentum=config.optim.momentum)


def _num_steps(config) -> int:
  return int(config.epochs) * _steps_per_epoch(config)


def _prompt_constants(config):
  """Token ids [P*C, 77], ctx slots, and token masks [P, G*G] of a run."""
  ids, slot = prompts.prompt_tokens(
    prompts.POSITIONS, tuple(config.model.classnames), prompts.N_CTX
  )
  return jnp.asarray(ids), jnp.asarray(slot)


def _token_masks(clip) -> jax.Array:
  c = clip.config
  masks = sas.region_masks(c.image_resolution)
  return jnp.asarray(sas.token_masks(masks, c.vision_patch_size))


def train_step(state: api.TrainState, batch, local_step, *, config, tx):
  """One step on a batch {"images" [B,S,S,1] uint8, "labels" [B] (1 = SAS
  applied), "regions" [B]}: BCE-with-logits of each image's two logits
  (its region's prompts) against one-hot labels (§3.4)."""
  del local_step
  clip = state.model().net("clip")
  ids, slot = _prompt_constants(config)
  token_masks = _token_masks(clip)
  x = prompts.to_clip_input(batch["images"])
  onehot = jax.nn.one_hot(batch["labels"], 2)

  def loss_fn(learner):
    text = prompts.text_features(clip, learner.ctx[...], ids, slot)
    text = prompts.normalize(text).reshape(len(prompts.POSITIONS), 2, -1)
    logits = prompts.region_logits(
      clip, learner.mask_embedding[...], token_masks, text, x, batch["regions"]
    )
    loss = optax.sigmoid_binary_cross_entropy(logits, onehot).mean()
    hit = jnp.argmax(logits, -1) == batch["labels"]
    return loss, {"train_accuracy": hit.mean()}

  state, loss, aux, gnorm = updates.update(state, "prompts", tx, loss_fn)
  return state, {"loss": loss, "l2_grads": gnorm, **aux}


class PPAD(api.Defaults):
  """jaxad.methods.ppad.METHOD."""

  def check_config(self, config: mlc.ConfigDict) -> None:
    """See `config_check.check` (ConfigError / ConfigPathError)."""
    config_check.check(config, trains=self.trains(config))

  def trains(self, config: mlc.ConfigDict) -> bool:
    return config.model.mode == "ppad" and not config.model.prompts_checkpoint

  def rescoring_changes(self) -> tuple[str, ...]:
    return ("score.",)

  def load_data(self, config: mlc.ConfigDict, workdir: str) -> PPADData:
    """The layout's known normals and test split; K shots drawn (seeded by
    data.shot_seed) from the known normals, recorded in W/shots.json; the
    calibration normals, `eval.calibration_fraction` of the known normals
    that are not shots (seeded by data.split_seed), in W/split.json."""
    from jaxad.data import splits

    fraction = float(config.eval.calibration_fraction)
    splits.check_calibration_fraction(fraction)  # before anything is written
    # Every known normal: the shots are drawn as before the calibration
    # split existed, and the calibration normals from the others.
    data = oneclass.load(config.data, workdir)
    k = int(config.data.shots)
    if self.trains(config):
      api.check_batches(
        len(data.normal),
        k,
        what=f"{data.name}: known normals",
        key="data.shots",
      )
    rng = np.random.default_rng(int(config.data.shot_seed))
    k = min(k, len(data.normal))
    index = np.sort(rng.choice(len(data.normal), k, replace=False))
    if jax.process_index() == 0:  # a record: every process draws the same
      storage.write_json(
        os.path.join(workdir, "shots.json"),
        {
          "shot_seed": int(config.data.shot_seed),
          "indices_into_known_normals": index.tolist(),
          "known_normals": len(data.normal),
        },
        indent=None,
      )
    rest = np.setdiff1d(np.arange(len(data.normal)), index)
    names = tuple(data.normal_names[i] for i in rest)
    held = oneclass.hold_out_calibration(
      workdir,
      names,
      fraction=fraction,
      seed=int(config.data.split_seed),
      what=f"{data.name}: known normals that are not shots",
    )
    return PPADData(
      name=data.name,
      shots=data.normal[index],
      test=data.test,
      test_labels=data.test_labels,
      test_names=data.test_names,
      test_masks=data.test_masks,
      calibration=data.normal[rest[held]],
      calibration_names=tuple(n for n, h in zip(names, held, strict=True) if h),
    )

  def synthetic_data(self, config: mlc.ConfigDict, num_images: int) -> PPADData:

    data = oneclass.synthetic(config.data, max(num_images, config.data.shots))
    return PPADData(
      name=data.name,
      shots=data.normal[: config.data.shots],
      test=data.test[:num_images],
      test_labels=data.test_labels[:num_images],
      test_names=data.test_names[:num_images],
      calibration=data.calibration,
      calibration_names=data.calibration_names,
    )

  def init_state(self, config: mlc.ConfigDict) -> api.TrainState:
    """The frozen CLIP from `model.clip_weights`, fresh (or imported)
    prompts and their SGD state."""
    self.check_config(config)
    clip_config, clip_params = frozen_clip.load_clip(
      config.model.clip_weights,
      bool(config.model.clip_fp16_round),
      config.model.clip_arch,
      int(config.seed),
    )
    if config.data.image_size != clip_config.image_resolution:
      raise ValueError(
        f"config.data.image_size={config.data.image_size}, but the CLIP in"
        f" {config.model.clip_weights} takes"
        f" {clip_config.image_resolution} px images"
      )
    learner = prompts.Prompts(
      prompts.N_CTX,
      clip_config.transformer_width,
      clip_config.grid_size,
      clip_config.vision_width,
      rngs=nnx.Rngs(config.seed),
    )
    if config.model.prompts_checkpoint:
      ctx, mask = frozen_clip.read_prompts(
        config.model.prompts_checkpoint,
        learner.ctx.shape,
        learner.mask_embedding.shape,
      )
      learner.ctx.value = jnp.asarray(ctx)
      learner.mask_embedding.value = jnp.asarray(mask)
    params, stats, opt = updates.init_net(
      learner, optimizer(config, _num_steps(config))
    )
    return api.new_state(
      params={"prompts": params},
      batch_stats={"prompts": stats},
      opt_state={"prompts": opt},
      frozen={"clip": {"params": clip_params, "batch_stats": {}}},
      graphdefs={
        "prompts": nnx.graphdef(learner),
        "clip": frozen_clip.clip_graphdef(config, clip_config),
      },
    )

  def phases(self, config: mlc.ConfigDict, data: PPADData) -> list[api.Phase]:
    """`epochs` passes over the K shots, each image with a random region
    and, with probability train.sas_probability, a SAS lesion in it."""
    if not self.trains(config):
      return []
    b, k = int(config.train.batch_size), len(data.shots)
    api.check_batches(k, b, what=f"{data.name}: shots", key="train.batch_size")
    spe, num_steps = k // b, _num_steps(config)
    p = float(config.train.sas_probability)
    gray = data.shots[..., 0]

    def batches(first_step: int):
      for step in range(first_step, num_steps):
        epoch, i = divmod(step, spe)
        order = np.random.default_rng([config.seed, 0, epoch]).permutation(k)
        rng = np.random.default_rng([config.seed, 1, step])
        regions = rng.integers(0, len(prompts.POSITIONS), b)
        images, labels, _ = sas.augment_batch(
          rng, gray[order[i * b : (i + 1) * b]], regions, p
        )
        yield {
          "images": images[..., None],
          "labels": labels,
          "regions": regions.astype(np.int32),
        }

    step = functools.partial(
      train_step, config=config, tx=optimizer(config, num_steps)
    )
    return [
      api.Phase(
        "ppad",
        num_steps,
        step,
        batch_size=b,
        batch_key="train.batch_size",
        batches=batches,
      )
    ]

  def scores(self, config: mlc.ConfigDict) -> tuple[api.Score, ...]:
    t = float(config.score.decision_threshold)
    if config.model.mode == "zero_shot":
      return (
        api.Score(
          "zero_shot",
          "softmax probability of 'pneumonia.' against 'normal.' (CLIP"
          " zero-shot, no prompts)",
          threshold=t,
        ),
      )
    return (
      api.Score(
        "ppad",
        "abnormal probability of the 5 position prompts, max if above"
        f" {config.score.fusion_threshold} else mean",
        threshold=t,
      ),
    )

  def score_context(self, config, model: api.Model, data) -> jax.Array:
    """Normalised text features [P, 2, E] of the prompts (zero-shot: P = 1,
    the plain class names), computed once per evaluation."""
    del data

    @jax.jit
    def text(model):
      clip = model.net("clip")
      if config.model.mode == "zero_shot":
        ids = clip_tokenizer.tokenize(
          [f"{c}." for c in config.model.classnames]
        )
        return prompts.normalize(clip.encode_text(jnp.asarray(ids)))[None]
      ids, slot = _prompt_constants(config)
      t = prompts.text_features(clip, model.params["prompts"]["ctx"], ids, slot)
      return prompts.normalize(t).reshape(len(prompts.POSITIONS), 2, -1)

    return text(model)

  def score(self, config, model: api.Model, context, images) -> api.ScoreOutput:
    """Abnormal probability [B] of uint8 images [B, S, S, 1]; no maps."""
    clip = model.net("clip")
    x = prompts.to_clip_input(images)
    b = images.shape[0]  # symbolic under jax.export
    if config.model.mode == "zero_shot":
      z = prompts.normalize(clip.encode_image(x))
      logits = jnp.exp(clip.logit_scale[...]) * z @ context[0].T
      return {"scores": {"zero_shot": jax.nn.softmax(logits)[:, 1]}, "maps": {}}
    token_masks = _token_masks(clip)
    mask_embedding = model.params["prompts"]["mask_embedding"]
    probs = jnp.stack(
      [
        jax.nn.softmax(
          prompts.region_logits(
            clip,
            mask_embedding,
            token_masks,
            context,
            x,
            jnp.full((b,), r, jnp.int32),
          )
        )[:, 1]
        for r in range(len(prompts.POSITIONS))
      ]
    )
    fused = prompts.fuse(probs, float(config.score.fusion_threshold))
    return {"scores": {"ppad": fused}, "maps": {}}


METHOD = PPAD()
