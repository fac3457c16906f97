"""Multi-AD (Rahmaniar et al., Pattern Recognition 2026), METHODS.md 4, on
the method contract (jaxad/methods/api.py).

A frozen ImageNet-pretrained ResNet teacher and an identically shaped
student with SE blocks and dilated stages, trained from scratch on normal
images only: the student learns to reproduce the teacher's channel-
normalised features at four levels (layer1..layer4). A discriminator on the
level-4 features tells the teacher's from the student's and gives the
student an adversarial signal. At test time the per-level cosine distances
between teacher and student features are upsampled to the image size,
fused (product or sum) and Gaussian-smoothed; the image score is the
map's maximum.

Both updates (the student's, then the discriminator's) happen in one step.
The teacher lives in the state's `frozen` field: it is run in eval mode
under stop_gradient, has no optimizer state, and is never checkpointed;
`init_state` rebuilds it identically every time, from
`config.model.teacher_weights` (a torchvision checkpoint) or, with
"random", from a key derived from `config.seed` (`jaxad.models.teacher`).
Modules: `losses.py` (array functions), `nets.py` (networks from the
config).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from jaxad import config_checks
from jaxad.data import resident
from jaxad.methods import api, updates
from jaxad.methods.multiad import losses, nets
from jaxad.models import resnet, teacher

Array = jax.Array
SCORE = "multiad"  # the key in eval.json
LEVELS = ("layer1", "layer2", "layer3", "layer4")
# torchvision's ImageNet normalisation, which the teacher was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------- forward


def to_teacher_input(images: Array) -> Array:
  """uint8 [B, S, S, C] -> float32 [B, S, S, 3], ImageNet-normalised.

  ToTensor then Normalize(ImageNet mean/std), as Med-AD; grayscale
  (C = 1) is repeated to the 3 channels the pretrained stem expects.
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def teacher_features(model: api.Model, x: Array) -> list[Array]:
  """The frozen teacher's layer1..4 features [B, H_l, W_l, C_l] of x
  [B, S, S, 3] (eval-mode BN), no gradient."""
  feats = model.net("teacher")(x, train=False)
  return [jax.lax.stop_gradient(feats[k]) for k in LEVELS]


def _disc_logits(disc, f4: Array, key: Array, normalized: bool) -> Array:
  """D's [B] logits (train mode: dropout from `key`, batch statistics) of
  level-4 features [B, H4, W4, C4]; Fig. 1's F_N4 when `normalized`."""
  return disc(
    losses.l2_normalize(f4) if normalized else f4, train=True, key=key
  )


# ----------------------------------------------------------------- train step


def train_step(
  state: api.TrainState,
  inputs: dict[str, Array],
  local_step: Array,
  *,
  num_images: int,
  batch_size: int,
  adv_weight: float,
  disc_normalized: bool,
  txs: dict[str, optax.GradientTransformation],
) -> tuple[api.TrainState, dict[str, Array]]:
  """A student update, then a discriminator update, on one batch.

  Args:
    state: student and discriminator (trained), teacher (frozen).
    inputs: {"images": [N, S, S, C] uint8 resident known normals,
      "data_key": PRNG key of the epoch-wise data order, "noise_key": PRNG
      key of the dropout masks, folded with the step}.
    local_step: int32 step within the phase (the only phase: it starts at
      global step 0), for the data order and the dropout masks.
    num_images: N (static).
    batch_size: B (static).
    adv_weight: lambda_adv of the student's adversarial term (static; 0
      skips the discriminator in the student's update, as Med-AD).
    disc_normalized: the discriminator reads normalised features.
    txs: {"student", "disc"} optimizers (`nets.optimizers`).

  Returns:
    The new state and {"student_loss", "kd_loss", "adv_loss", "disc_loss",
    "disc_real", "disc_fake" (mean D probabilities), "l2_grads",
    "disc_l2_grads"}.
  """
  idx = resident.sample_indices(
    num_images, local_step, inputs["data_key"], batch_size
  )
  x = api.shard_batch(to_teacher_input(inputs["images"][idx]))  # (B,S,S,3)
  k_adv, k_real, k_fake = jax.random.split(
    jax.random.fold_in(inputs["noise_key"], local_step), 3
  )
  before = state.model()  # D as it is before this step, for the student
  t_feats = teacher_features(before, x)

  def student_loss(student):
    out = student(x, train=True)
    s_feats = [out[k] for k in LEVELS]
    kd = jnp.sum(losses.distillation_loss(t_feats, s_feats))
    adv = jnp.zeros(())
    if adv_weight:
      # D is fixed: no gradient reaches its parameters (only the
      # student's are differentiated), and the statistics this forward
      # updates are dropped with the module (D's own update below sets
      # them). Merged here, inside the traced loss: NNX refuses to update a
      # module built outside it.
      disc = before.net("disc")
      logits = _disc_logits(disc, s_feats[-1], k_adv, disc_normalized)
      adv = jnp.mean(losses.bce_with_logits(logits, 1.0))
    return kd + adv_weight * adv, (kd, adv, s_feats[-1])

  # The student's BN statistics of this forward are stored.
  state, loss, (kd, adv, s4), s_gnorm = updates.update(
    state, "student", txs["student"], student_loss
  )

  # The discriminator sees this batch's student features (before the
  # student's update), detached: a second student forward is not needed.
  fake = jax.lax.stop_gradient(s4)

  def disc_loss(disc):
    # Real then fake through the same module: its BN statistics are those
    # after both forwards.
    real_logits = _disc_logits(disc, t_feats[-1], k_real, disc_normalized)
    fake_logits = _disc_logits(disc, fake, k_fake, disc_normalized)
    loss = jnp.mean(losses.bce_with_logits(real_logits, 1.0)) + jnp.mean(
      losses.bce_with_logits(fake_logits, 0.0)
    )
    return loss, (real_logits, fake_logits)

  state, d_loss, (real, fake_logits), d_gnorm = updates.update(
    state, "disc", txs["disc"], disc_loss
  )
  if not adv_weight:  # report the adversarial loss all the same
    adv = jnp.mean(losses.bce_with_logits(fake_logits, 1.0))
  return state, {
    "student_loss": loss,
    "kd_loss": kd,
    "adv_loss": adv,
    "disc_loss": d_loss,
    "disc_real": jnp.mean(jax.nn.sigmoid(real)),
    "disc_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
    "l2_grads": s_gnorm,
    "disc_l2_grads": d_gnorm,
  }


# -------------------------------------------------------------------- method


def _check_networks(m: mlc.ConfigDict) -> None:
  """The teacher's and student's `resnet.ResNet` arguments and D's, as
  the constructors would refuse them, without building anything."""
  if m.variant not in resnet.VARIANTS:
    raise config_checks.refuse(
      "model.variant", m.variant, f"one of {list(resnet.VARIANTS)}"
    )
  for key in ("se", "teacher_se"):
    if m[key] not in resnet.SE_MODES:
      raise config_checks.refuse(
        f"model.{key}", m[key], f"one of {list(resnet.SE_MODES)}"
      )
  blocks = tuple(m.num_blocks)
  if blocks and (len(blocks) != 4 or min(blocks) < 1):
    raise config_checks.refuse(
      "model.num_blocks", blocks, "() or 4 stages of >= 1 block each"
    )
  basic = resnet.VARIANTS[m.variant][0] == "basic"
  for key in ("student_dilation", "teacher_dilation"):
    dilation = tuple(m[key])
    if len(dilation) != 4 or min(dilation) < 1:
      raise config_checks.refuse(
        f"model.{key}", dilation, "4 dilations >= 1, one per stage"
      )
    if basic and max(dilation) > 1:
      raise config_checks.refuse(
        f"model.{key}",
        dilation,
        f"basic blocks ({m.variant}) support only dilation 1, as torchvision's",
      )
  config_checks.check_int("model.se_reduction", m.se_reduction, 1)
  channels = tuple(m.disc_channels)
  if not channels or min(channels) < 1:
    raise config_checks.refuse(
      "model.disc_channels", channels, "one or more widths >= 1"
    )


class MultiAD(api.Defaults):
  """The Multi-AD method object (see jaxad/methods/api.py)."""

  @config_checks.config_errors
  def check_config(self, config: mlc.ConfigDict) -> None:
    """Refuses an impossible Multi-AD config before any data or compute.

    Any image size works (the maps are resized to it; layer4 is
    ceil(S / 32) wide).

    Raises:
      ConfigError: a shared check (`jaxad.config_checks`), no teacher
        weights, an unknown fusion, variant or SE mode, a network shape
        the ResNet refuses, or a Gaussian the score cannot use.
      ConfigPathError: a teacher checkpoint path that does not exist.
    """
    config_checks.check_shared(config, trains=True, method="Multi-AD")
    teacher.check_weights(
      config.model.teacher_weights,
      config.model.variant,
      method="Multi-AD",
      offline=" (or configs/multiad.py:offline)",
    )
    losses.check_fusion(config.score.fusion)
    _check_networks(config.model)
    # The score's Gaussian (also refuses a sigma <= 0, an even width).
    losses.gaussian_kernel(config.score.sigma, config.score.kernel_size)

  def init_state(self, config: mlc.ConfigDict) -> api.TrainState:
    """Fresh student and discriminator, the frozen teacher; unplaced."""
    self.check_config(config)
    root = jax.random.key(config.seed)
    params, stats, opt = nets.init_trained(config, root)
    return api.new_state(
      params=params,
      batch_stats=stats,
      opt_state=opt,
      frozen={"teacher": nets.load_teacher(config, root)},
      graphdefs=nets.graphdefs(config),
    )

  def phases(self, config: mlc.ConfigDict, data) -> list[api.Phase]:
    """One phase: `config.epochs` epochs over the known normals.

    Multi-AD is unsupervised: an unlabeled pool, if the layout has one, is
    not used.
    """
    b = config.train.batch_size
    n = len(data.normal)
    api.check_batches(
      n, b, what=f"{data.name}: known normals", key="train.batch_size"
    )
    step = functools.partial(
      train_step,
      num_images=n,
      batch_size=b,
      adv_weight=float(config.loss.adv_weight),
      disc_normalized=config.model.disc_normalized,
      txs=nets.optimizers(config),
    )
    return [
      api.Phase(
        "multiad",
        config.epochs * (n // b),
        step,
        batch_size=b,
        batch_key="train.batch_size",
        inputs={"images": data.normal, **updates.step_keys(config.seed, 1000)},
      )
    ]

  def scores(self, config: mlc.ConfigDict) -> tuple[api.Score, ...]:
    del config
    return (
      api.Score(
        SCORE,
        "fused multi-scale teacher-student cosine distance, "
        "Gaussian-smoothed; image score: max of the map",
      ),
    )

  def score(self, config, model: api.Model, context, images):
    """Teacher vs student (eval-mode BN) cosine maps of uint8 [B, S, S, C]
    images.

    Returns:
      {"scores": {"multiad": [B]}, "maps": {"multiad": [B, S, S]}}; the
      image score is the maximum of the fused, smoothed map.
    """
    del context
    x = to_teacher_input(images)
    out = model.net("student")(x, train=False)
    s = config.score
    amap = losses.anomaly_map(
      teacher_features(model, x),
      [out[k] for k in LEVELS],
      images.shape[1],
      fusion=s.fusion,
      sigma=s.sigma,
      kernel_size=s.kernel_size,
    )
    return {
      "scores": {SCORE: jnp.max(amap, axis=(1, 2))},
      "maps": {SCORE: amap},
    }


METHOD = MultiAD()
