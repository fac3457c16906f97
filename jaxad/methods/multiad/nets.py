"""Multi-AD's networks: the teacher, student and discriminator that a config
describes, their abstract graphs, initialisers and optimizers.

The frozen teacher's weights come from `jaxad.models.teacher` (shared with
other teacher-student methods); this module only turns Multi-AD's config
into its arguments.
"""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx

from jaxad import optim
from jaxad.models import discriminator, teacher

TRAINED = ("student", "disc")  # the networks with parameters to update


def resnet_kwargs(config: mlc.ConfigDict, role: str) -> dict:
  """`resnet.ResNet` keyword arguments of the "teacher" or the "student"."""
  m = config.model
  kw = dict(
    variant=m.variant,
    num_blocks=tuple(m.num_blocks) or None,
    stages=4,
    in_channels=3,
    se_reduction=m.se_reduction,
  )
  if role == "teacher":
    # METHODS 4.2 option (a) by default: the plain pretrained network.
    kw |= dict(se=m.teacher_se, dilation=tuple(m.teacher_dilation))
  else:
    kw |= dict(se=m.se, se_stem=m.se_stem, dilation=tuple(m.student_dilation))
  return kw


def _layer4_shape(kw: dict, size: int) -> tuple[int, ...]:
  """[1, H4, W4, C4] of a ResNet's layer4 at input size x size (abstract:
  shapes only, nothing is initialised or compiled)."""
  gd, state = nnx.split(nnx.eval_shape(lambda: teacher.build(kw, 0)))
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(
    lambda s, x: nnx.merge(gd, s)(x, train=False)["layer4"], state, x
  ).shape


def disc_kwargs(config: mlc.ConfigDict) -> dict:
  """Discriminator arguments; its input shape is the student's layer4."""
  m = config.model
  f4 = _layer4_shape(resnet_kwargs(config, "student"), config.data.image_size)
  return dict(
    in_channels=f4[-1],
    spatial=f4[1:3],
    channels=tuple(m.disc_channels),
    negative_slope=m.disc_slope,
    dropout=m.disc_dropout,
  )


def _build_disc(kw: dict, key) -> discriminator.Discriminator:
  return discriminator.Discriminator(**kw, rngs=nnx.Rngs(key))


def graphdefs(config: mlc.ConfigDict) -> dict[str, nnx.GraphDef]:
  """{"teacher", "student", "disc"}: the networks' abstract graphs."""
  disc = disc_kwargs(config)
  return {
    "teacher": teacher.graphdef(resnet_kwargs(config, "teacher")),
    "student": teacher.graphdef(resnet_kwargs(config, "student")),
    "disc": nnx.graphdef(nnx.eval_shape(lambda: _build_disc(disc, 0))),
  }


def optimizers(
  config: mlc.ConfigDict,
) -> dict[str, optax.GradientTransformation]:
  """{"student", "disc"}: Adam with coupled L2 (PyTorch's weight_decay),
  no schedule; the same for the same config (init and step use it)."""
  o = config.optim
  return {
    "student": optim.adam_l2(o.lr, o.weight_decay, o.b1, o.b2),
    "disc": optim.adam_l2(o.disc_lr, o.disc_weight_decay, o.b1, o.b2),
  }


def init_trained(config: mlc.ConfigDict, root: jax.Array):
  """Fresh student and discriminator, with their optimizer states.

  Init keys are fold_in(root, i): 0 the student, 2 the discriminator (1 is
  a random teacher's, see `load_teacher`).

  Returns:
    ({name: params}, {name: batch_stats}, {name: opt_state}) for the names
    in TRAINED; unplaced.
  """
  txs = optimizers(config)
  student_kw, disc_kw = resnet_kwargs(config, "student"), disc_kwargs(config)
  builds = {
    "student": (0, lambda k: teacher.build(student_kw, k)),
    "disc": (2, lambda k: _build_disc(disc_kw, k)),
  }
  params, stats, opt = {}, {}, {}
  for name in TRAINED:
    i, build = builds[name]
    init = teacher.jit_init(build, txs[name])
    params[name], stats[name], opt[name] = init(jax.random.fold_in(root, i))
  return params, stats, opt


def load_teacher(config: mlc.ConfigDict, root: jax.Array) -> dict:
  """The frozen teacher {"params", "batch_stats"} of `config.model`: from
  the torchvision checkpoint `teacher_weights`, or with "random" from
  fold_in(root, 1)."""
  params, stats = teacher.load_teacher(
    resnet_kwargs(config, "teacher"),
    config.model.teacher_weights,
    jax.random.fold_in(root, 1),
    method="Multi-AD",
  )
  return {"params": params, "batch_stats": stats}
