"""Multi-AD (Rahmaniar et al., Pattern Recognition 2026), METHODS.md 4.

A frozen ImageNet-pretrained ResNet teacher and an identically shaped
student with SE blocks and dilated stages, trained from scratch on normal
images only: the student learns to reproduce the teacher's channel-
normalised features at four levels (layer1..layer4). A discriminator on the
level-4 features tells the teacher's from the student's and gives the
student an adversarial signal. At test time the per-level cosine distances
between teacher and student features are upsampled to the image size,
fused (product or sum) and Gaussian-smoothed; the image score is the
map's maximum.

Both updates (the student's, then the discriminator's) happen in one jitted
step. The teacher lives in the state's `frozen` field: it is run in eval
mode under stop_gradient, has no optimizer state, and is never
checkpointed; `init_state` rebuilds it identically every time, from
`config.model.teacher_weights` (a torchvision checkpoint) or, with
"random", from a key derived from `config.seed`.
"""

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx

from jaxad import loop, optim, sharding
from jaxad.data import oneclass, resident
from jaxad.methods import multiad_losses as losses
from jaxad.methods import multiad_nets as nets

Array = jax.Array
SCORE = "multiad"  # the key in eval.json
LEVELS = ("layer1", "layer2", "layer3", "layer4")
# torchvision's ImageNet normalisation, which the teacher was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@flax.struct.dataclass
class TrainState:
  """Student and discriminator (trained), teacher (frozen)."""

  step: Array
  params: dict[str, Any]  # {"student": tree, "disc": tree}
  batch_stats: dict[str, Any]  # likewise
  opt_state: dict[str, Any]  # likewise
  # {"params", "batch_stats"} of the teacher: never differentiated, updated
  # or checkpointed (jaxad.checkpoint skips the field named `frozen`).
  frozen: dict[str, Any]
  teacher_graphdef: Any = flax.struct.field(pytree_node=False)
  student_graphdef: Any = flax.struct.field(pytree_node=False)
  disc_graphdef: Any = flax.struct.field(pytree_node=False)
  student_tx: optax.GradientTransformation = flax.struct.field(
    pytree_node=False
  )
  disc_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


# ---------------------------------------------------------------------- setup


def check_config(config: mlc.ConfigDict) -> None:
  """Refuses a config that cannot run, before anything is written.

  Raises:
    ValueError: no teacher weights, or an unknown fusion mode.
    FileNotFoundError: a teacher checkpoint path that does not exist.
  """
  path = config.model.teacher_weights
  if not path:
    urls = ", ".join(f"{v} ({k})" for k, v in nets.TORCHVISION_URLS.items())
    raise ValueError(
      "config.model.teacher_weights is empty. Multi-AD's teacher is an "
      "ImageNet-pretrained ResNet: download torchvision's checkpoint for "
      f"config.model.variant={config.model.variant!r} ({urls}) and pass "
      "--config.model.teacher_weights=/path/to/file.pth (or .safetensors). "
      "Without it, --config.model.teacher_weights=random (or "
      "configs/multiad.py:offline) trains against a randomly initialised "
      "frozen teacher: runnable offline, but not the paper's setting."
    )
  if path != nets.RANDOM and not os.path.isfile(path):
    raise FileNotFoundError(
      f"config.model.teacher_weights: no such file {path!r}"
    )
  losses.check_fusion(config.score.fusion)


def init_state(config: mlc.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
  """Fresh student and discriminator, the frozen teacher; replicated."""
  check_config(config)
  teacher_params, teacher_stats = nets.load_teacher(config, mesh)
  o = config.optim
  txs = {
    "student": optim.adam_l2(o.lr, o.weight_decay, o.b1, o.b2),
    "disc": optim.adam_l2(o.disc_lr, o.disc_weight_decay, o.b1, o.b2),
  }
  kinds = {
    "teacher": ("resnet", nets.resnet_kwargs(config, "teacher")),
    "student": ("resnet", nets.resnet_kwargs(config, "student")),
    "disc": ("disc", nets.disc_kwargs(config)),
  }
  root = jax.random.key(config.seed)
  params, stats, opt = {}, {}, {}
  # Init keys fold_in(seed, i); i = 1 is a random teacher's (multiad_nets).
  for i, name in ((0, "student"), (2, "disc")):
    init = nets.initializer(*kinds[name], txs[name], mesh)
    params[name], stats[name], opt[name] = init(jax.random.fold_in(root, i))
  return TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
    params=params,
    batch_stats=stats,
    opt_state=opt,
    frozen={"params": teacher_params, "batch_stats": teacher_stats},
    teacher_graphdef=nets.graphdef(*kinds["teacher"]),
    student_graphdef=nets.graphdef(*kinds["student"]),
    disc_graphdef=nets.graphdef(*kinds["disc"]),
    student_tx=txs["student"],
    disc_tx=txs["disc"],
  )


# ----------------------------------------------------------------- train step


def to_teacher_input(images: Array) -> Array:
  """uint8 [B, S, S, C] -> float [B, S, S, 3], ImageNet-normalised.

  ToTensor then Normalize(ImageNet mean/std), as Med-AD; grayscale
  (C = 1) is repeated to the 3 channels the pretrained stem expects.
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def teacher_features(state: TrainState, x: Array) -> list[Array]:
  """The frozen teacher's layer1..4 features (eval-mode BN), no gradient."""
  teacher = nnx.merge(
    state.teacher_graphdef,
    state.frozen["params"],
    state.frozen["batch_stats"],
  )
  feats = teacher(x, train=False)
  return [jax.lax.stop_gradient(feats[k]) for k in LEVELS]


def _disc_input(f4: Array, normalized: bool) -> Array:
  """Fig. 1's F_N4: the channel-normalised level-4 features (a flag)."""
  return losses.l2_normalize(f4) if normalized else f4


def train_step(
  state: TrainState,
  inputs: dict[str, Array],
  *,
  num_images: int,
  batch_size: int,
  adv_weight: float,
  disc_normalized: bool,
  batch_sharding,
) -> tuple[TrainState, dict[str, Array]]:
  """A student update, then a discriminator update, on one batch.

  Args:
    state: the current state (donated by the caller's jit).
    inputs: {"images": [N, S, S, C] uint8 resident known normals,
      "data_key": PRNG key of the epoch-wise data order, "noise_key": PRNG
      key of the dropout masks, folded with the step}.
    num_images: N (static).
    batch_size: B (static).
    adv_weight: lambda_adv of the student's adversarial term (static; 0
      skips the discriminator in the student's update, as Med-AD).
    disc_normalized: the discriminator reads normalised features.

  Returns:
    The new state and {"student_loss", "kd_loss", "adv_loss", "disc_loss",
    "disc_real", "disc_fake" (mean D probabilities), "l2_grads",
    "disc_l2_grads"}.
  """
  idx = resident.sample_indices(
    num_images, state.step, inputs["data_key"], batch_size
  )
  x = to_teacher_input(inputs["images"][idx])  # (B, S, S, 3)
  x = jax.lax.with_sharding_constraint(x, batch_sharding)
  k_adv, k_real, k_fake = jax.random.split(
    jax.random.fold_in(inputs["noise_key"], state.step), 3
  )
  t_feats = teacher_features(state, x)
  d_params, d_stats = state.params["disc"], state.batch_stats["disc"]

  def disc(params, stats, f, key):
    net = nnx.merge(state.disc_graphdef, params, stats)
    logits = net(_disc_input(f, disc_normalized), train=True, key=key)
    return logits, nnx.state(net, nnx.BatchStat).to_pure_dict()

  def student_loss(params):
    net = nnx.merge(
      state.student_graphdef, params, state.batch_stats["student"]
    )
    out = net(x, train=True)
    s_feats = [out[k] for k in LEVELS]
    kd = jnp.sum(losses.distillation_loss(t_feats, s_feats))
    adv = jnp.zeros(())
    if adv_weight:
      # D is fixed here (no gradient to its parameters); the statistics of
      # this forward are dropped, D's own update below sets them.
      logits, _ = disc(d_params, d_stats, s_feats[-1], k_adv)
      adv = jnp.mean(losses.bce_with_logits(logits, 1.0))
    stats = nnx.state(net, nnx.BatchStat).to_pure_dict()
    return kd + adv_weight * adv, (kd, adv, stats, s_feats[-1])

  params = state.params["student"]
  (loss, (kd, adv, s_stats, s4)), grads = jax.value_and_grad(
    student_loss, has_aux=True
  )(params)
  updates, s_opt = state.student_tx.update(
    grads, state.opt_state["student"], params
  )
  params = optax.apply_updates(params, updates)

  # The discriminator sees this batch's student features (before the
  # student's update), detached: a second student forward is not needed.
  fake = jax.lax.stop_gradient(s4)

  def disc_loss(dp):
    real_logits, stats = disc(dp, d_stats, t_feats[-1], k_real)
    fake_logits, stats = disc(dp, stats, fake, k_fake)
    loss = jnp.mean(losses.bce_with_logits(real_logits, 1.0)) + jnp.mean(
      losses.bce_with_logits(fake_logits, 0.0)
    )
    return loss, (stats, real_logits, fake_logits)

  (d_loss, (d_stats, real, fake_logits)), d_grads = jax.value_and_grad(
    disc_loss, has_aux=True
  )(d_params)
  d_updates, d_opt = state.disc_tx.update(
    d_grads, state.opt_state["disc"], d_params
  )
  if not adv_weight:  # report the adversarial loss all the same
    adv = jnp.mean(losses.bce_with_logits(fake_logits, 1.0))
  new_state = state.replace(
    step=state.step + 1,
    params={
      "student": params,
      "disc": optax.apply_updates(d_params, d_updates),
    },
    batch_stats={"student": s_stats, "disc": d_stats},
    opt_state={"student": s_opt, "disc": d_opt},
  )
  return new_state, {
    "student_loss": loss,
    "kd_loss": kd,
    "adv_loss": adv,
    "disc_loss": d_loss,
    "disc_real": jnp.mean(jax.nn.sigmoid(real)),
    "disc_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
    "l2_grads": optax.global_norm(grads),
    "disc_l2_grads": optax.global_norm(d_grads),
  }


@functools.lru_cache(maxsize=8)
def _jitted_step(
  num_images: int,
  batch_size: int,
  adv_weight: float,
  disc_normalized: bool,
  steps_per_call: int,
  mesh: jax.sharding.Mesh,
):
  """The jitted (single, multi-step) `train_step`s; cached, so a resumed
  run in the same process (tests) reuses their compilation."""
  step = functools.partial(
    train_step,
    num_images=num_images,
    batch_size=batch_size,
    adv_weight=adv_weight,
    disc_normalized=disc_normalized,
    batch_sharding=sharding.batch_sharded(mesh),
  )
  # The state is donated: the student's and D's buffers are updated in
  # place, the teacher's pass through. Replicated outputs: the state stays
  # replicated, and metrics can be fetched on every host.
  return loop.jit_steps(
    step,
    steps_per_call=steps_per_call,
    out_shardings=sharding.replicated(mesh),
  )


def phases(
  config: mlc.ConfigDict,
  data: oneclass.OneClassData,
  mesh: jax.sharding.Mesh,
) -> list[loop.Phase]:
  """One phase: `config.epochs` epochs over the known normals.

  Multi-AD is unsupervised: an unlabeled pool, if the layout has one, is
  not used.
  """
  b = config.train.batch_size
  sharding.check_batch(b, mesh, "config.train.batch_size")
  n = len(data.normal)
  if n < b:
    raise ValueError(
      f"{data.name}: {n} known-normal images, fewer than one batch "
      f"(config.train.batch_size={b})"
    )
  root = jax.random.fold_in(jax.random.key(config.seed), 1000)
  inputs = {
    "images": data.normal,
    "data_key": jax.random.fold_in(root, 0),
    "noise_key": jax.random.fold_in(root, 1),
  }
  k = config.train.steps_per_call
  single, multi = _jitted_step(
    n, b, float(config.loss.adv_weight), config.model.disc_normalized, k, mesh
  )
  return [
    loop.Phase(
      "multiad",
      config.epochs * (n // b),
      single,
      jax.device_put(inputs, sharding.replicated(mesh)),
      member_images_per_step=b,
      images_per_step=b,
      multi_step_fn=multi,
      steps_per_call=k,
    )
  ]


# -------------------------------------------------------------------- scoring


def score_fn(
  state: TrainState,
  images: Array,
  *,
  config: mlc.ConfigDict,
) -> dict[str, dict[str, Array]]:
  """Scores a batch: teacher vs student (eval-mode BN) cosine maps.

  Args:
    images: [B, S, S, C] uint8.

  Returns:
    {"scores": {"multiad": [B]}, "maps": {"multiad": [B, S, S]}}; the image
    score is the maximum of the fused, smoothed map.
  """
  x = to_teacher_input(images)
  student = nnx.merge(
    state.student_graphdef,
    state.params["student"],
    state.batch_stats["student"],
  )
  out = student(x, train=False)
  s = config.score
  amap = losses.anomaly_map(
    teacher_features(state, x),
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
