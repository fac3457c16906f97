"""D²4FAD's forward passes: per-slice BatchNorm, the training loss, scoring.

Sources: the original's `main.py` (training step) and `test.py`
(`evaluation`), ttttqz/D24FAD @42425f1; METHODS.md 2.3, 2.5, 2.6, 2.11.

Pure functions of (graphdef, pure-dict params / batch_stats, arrays), so
they jit, grad and shard as they are. All features are NHWC float32:
e4 [.., h, w, 2048] in, (d1, d2, d3) out (256@8h, 512@4h, 1024@2h).

BatchNorm in training. The original runs the decoder in train mode once on
the query batch, then once per support slice k = 1..K (`for k, sup_img in
enumerate(support_img)`), so every slice is normalised with its own batch
statistics and the running statistics take K+1 sequential updates
(momentum 0.1, unbiased variance). Three ways to run the S = K+1 slices:

* `decode_sequential_bn`: exactly that, a `lax.scan` over the slices that
  threads the BN state (the reference; slices run one after the other);
* `decode_parallel_bn`: the same maths, all slices at once (`vmap`, each
  slice its own statistics), and the K+1 running-average updates applied in
  closed form afterwards (equal up to float rounding);
* `decode_fast_bn`: one decoder call on all S*B samples, so ONE set of batch
  statistics and one running-average update: not the original's maths.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxad.methods.d24fad import losses
from jaxad.models import layers

Array = jax.Array
Feats = tuple[Array, Array, Array]


def decode_sequential_bn(
  graphdef: nnx.GraphDef, params: dict, batch_stats: dict, e4: Array
) -> tuple[Feats, dict]:
  """Train-mode decoder on each slice in turn, threading the BN state.

  Args:
    graphdef: the `ReverseDecoder`'s graph definition.
    params, batch_stats: its pure-dict state.
    e4: [S, B, h, w, C_in] slices, in the original's order: the query
      slice first, then supports 1..K.

  Returns:
    ((d1, d2, d3) each [S, B, H, W, C], batch_stats after the S sequential
    running-average updates).
  """

  def body(stats, x):
    model = nnx.merge(graphdef, params, stats)
    feats = model(x, train=True)
    return nnx.state(model, nnx.BatchStat).to_pure_dict(), feats

  stats, feats = jax.lax.scan(body, batch_stats, e4)
  return tuple(feats), stats


def _bn_momentum(graphdef: nnx.GraphDef, params: dict, stats: dict) -> float:
  """The momentum shared by all the decoder's BatchNorms."""
  model = nnx.merge(graphdef, params, stats)
  momenta = {
    m.momentum
    for _, m in nnx.iter_graph(model)
    if isinstance(m, layers.BatchNorm)
  }
  if len(momenta) != 1:
    raise ValueError(f"the BatchNorms use different momenta: {momenta}")
  return momenta.pop()


def decode_parallel_bn(
  graphdef: nnx.GraphDef, params: dict, batch_stats: dict, e4: Array
) -> tuple[Feats, dict]:
  """`decode_sequential_bn`'s maths with the slices run side by side.

  Every slice is normalised with its own batch statistics (a `vmap` over
  slices, METHODS.md 2.11). Slice k alone would give the running value
  n_k = (1 - m) r + m u_k from the initial r; the S sequential updates give
  (1 - m)^S r + sum_k (1 - m)^(S-1-k) m u_k, computed from the n_k here.

  Args and returns: as `decode_sequential_bn`.
  """

  def one(x):
    model = nnx.merge(graphdef, params, batch_stats)
    feats = model(x, train=True)
    return feats, nnx.state(model, nnx.BatchStat).to_pure_dict()

  feats, updated = jax.vmap(one)(e4)
  m = _bn_momentum(graphdef, params, batch_stats)
  s = e4.shape[0]
  decay = jnp.asarray([(1.0 - m) ** (s - 1 - k) for k in range(s)])

  def combine(r, n):  # r [C] initial, n [S, C] one update each
    return (1.0 - m) ** s * r + jnp.tensordot(decay, n - (1.0 - m) * r, 1)

  return tuple(feats), jax.tree.map(combine, batch_stats, updated)


def decode_fast_bn(
  graphdef: nnx.GraphDef, params: dict, batch_stats: dict, e4: Array
) -> tuple[Feats, dict]:
  """One train-mode decoder call on all S*B samples (one set of batch
  statistics, one running-average update): faster, NOT the original's
  maths. Args and returns: as `decode_sequential_bn`."""
  s, b = e4.shape[:2]
  model = nnx.merge(graphdef, params, batch_stats)
  feats = model(e4.reshape(s * b, *e4.shape[2:]), train=True)
  feats = tuple(f.reshape(s, b, *f.shape[1:]) for f in feats)
  return feats, nnx.state(model, nnx.BatchStat).to_pure_dict()


BN_MODES = {
  "sequential": decode_sequential_bn,
  "parallel": decode_parallel_bn,
  "fast": decode_fast_bn,
}


def train_loss(
  params: dict,
  batch_stats: dict,
  e4_query: Array,
  e4_support: Array,
  teacher: Sequence[Array],
  *,
  decoder_def: nnx.GraphDef,
  l2w_def: nnx.GraphDef,
  bn_mode: str = "sequential",
) -> tuple[Array, dict]:
  """The training loss of main.py: L = L_SSD + 0.1 L_TSD, and what it used.

  Differentiate w.r.t. `params` (`jax.value_and_grad(..., has_aux=True)`).

  Args:
    params: {"decoder": ReverseDecoder params, "l2w": LearnToWeight params}.
    batch_stats: the decoder's BN running statistics.
    e4_query: [B, h, w, 2048] the teacher's layer4 of the queries.
    e4_support: [K, B, h, w, 2048] of the supports (support k of query b).
    teacher: (f1, f2, f3) the teacher's layer1..3 of the queries,
      [B, 8h, 8w, 256], [B, 4h, 4w, 512], [B, 2h, 2w, 1024].
    decoder_def, l2w_def: the two graph definitions.
    bn_mode: a key of `BN_MODES` ("sequential" is the original's).

  Returns:
    (loss, aux): the float32 scalar loss and {"tsd", "ssd": scalars,
    "attention": per scale [B, K], "query": per scale [B, H, W, C],
    "support": per scale [K, B, H, W, C], "weighted": per scale
    [B, H, W, C], "batch_stats": the updated running statistics}.
  """
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be one of {list(BN_MODES)}: {bn_mode!r}")
  # The teacher is frozen (the original does not detach e4 but never steps
  # the teacher: the same maths).
  e4 = jax.lax.stop_gradient(
    jnp.concatenate([e4_query[None], e4_support], axis=0)
  )
  feats, new_stats = BN_MODES[bn_mode](
    decoder_def, params["decoder"], batch_stats, e4
  )
  query = tuple(f[0] for f in feats)
  support = tuple(f[1:] for f in feats)
  weighted, attention = nnx.merge(l2w_def, params["l2w"])(query, support)
  tsd = losses.tsd_loss(teacher, query)
  ssd = losses.ssd_loss(query, weighted)
  aux = {
    "tsd": tsd,
    "ssd": ssd,
    "attention": tuple(attention),
    "query": query,
    "support": support,
    "weighted": tuple(weighted),
    "batch_stats": new_stats,
  }
  return losses.total_loss(ssd, tsd), aux


def support_features(
  params: dict, batch_stats: dict, e4_support: Array, *, decoder_def
) -> Feats:
  """The supports' eval-mode decoder features, per scale [K, 1, H, W, C].

  Computed once per evaluation (the scoring context): with eval-mode BN a
  support's features do not depend on the batch it is decoded in, so the
  original's per-batch re-decoding of the replicated supports is skipped.

  Args:
    e4_support: [K, h, w, 2048] the teacher's layer4 of the K supports.
  """
  feats = nnx.merge(decoder_def, params["decoder"], batch_stats)(
    e4_support, train=False
  )
  return tuple(f[:, None] for f in feats)


def score_queries(
  params: dict,
  batch_stats: dict,
  e4_query: Array,
  support: Feats,
  *,
  decoder_def: nnx.GraphDef,
  l2w_def: nnx.GraphDef,
  size: int = 128,
  sigma: float = 4.0,
) -> dict[str, Array]:
  """Test-time scoring of test.py `evaluation` (eval-mode BN).

  Args:
    params, batch_stats, decoder_def, l2w_def: as `train_loss`.
    e4_query: [B, h, w, 2048].
    support: per scale [K, 1 or B, H, W, C] decoded support features
      (`support_features`).
    size: the image side S of the map.
    sigma: the Gaussian's standard deviation (scipy defaults otherwise).

  Returns:
    {"anomaly_map": [B, S, S] unsmoothed, "smoothed": [B, S, S] (per-image
    blur, see `losses.gaussian_smooth`), "image_score": [B] its max,
    "attention": per scale [B, K], "query", "weighted": per scale
    [B, H, W, C]}.
  """
  query = nnx.merge(decoder_def, params["decoder"], batch_stats)(
    e4_query, train=False
  )
  weighted, attention = nnx.merge(l2w_def, params["l2w"])(query, support)
  amap = losses.anomaly_map(query, weighted, size)
  smoothed = losses.gaussian_smooth(amap, sigma=sigma)
  return {
    "anomaly_map": amap,
    "smoothed": smoothed,
    "image_score": losses.image_score(smoothed),
    "attention": tuple(attention),
    "query": tuple(query),
    "weighted": tuple(weighted),
  }


def score(
  params: dict,
  batch_stats: dict,
  e4_query: Array,
  e4_support: Array,
  *,
  decoder_def: nnx.GraphDef,
  l2w_def: nnx.GraphDef,
  size: int = 128,
  sigma: float = 4.0,
) -> dict[str, Array]:
  """`score_queries` with per-query supports e4_support [K, B, h, w, 2048]
  (as the original, which replicates the supports to the batch)."""
  k, b = e4_support.shape[:2]
  feats = nnx.merge(decoder_def, params["decoder"], batch_stats)(
    e4_support.reshape(k * b, *e4_support.shape[2:]), train=False
  )
  support = tuple(f.reshape(k, b, *f.shape[1:]) for f in feats)
  return score_queries(
    params,
    batch_stats,
    e4_query,
    support,
    decoder_def=decoder_def,
    l2w_def=l2w_def,
    size=size,
    sigma=sigma,
  )
