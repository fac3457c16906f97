"""Optimizers shared by the methods."""

import optax


def adam_l2(
  lr: float, weight_decay: float, b1: float, b2: float
) -> optax.GradientTransformation:
  """PyTorch's Adam(weight_decay=...): L2 added to the gradient (coupled),
  before the moment estimates (not AdamW's decoupled decay).
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_adam(b1=b1, b2=b2),
    optax.scale(-lr),
  )
