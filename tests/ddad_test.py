"""Tests of DDAD's losses, scores, sampling and the (sharded) train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import ddad as ddad_config
from jaxad import loop, sharding
from jaxad.data import oneclass, resident
from jaxad.methods.ddad import METHOD, ensembles


def tiny_config(**model):
  c = ddad_config.get_config()
  c.data.image_size = 32
  c.model.num_members = 2
  c.model.width = 0.5
  c.train.batch_size = 8
  c.mesh.data = 1
  c.refine.enabled = False  # tests that need the stage turn it on
  c.model.update(model)
  return c


def tiny_data(n_normal=16, n_unlabeled=8, size=32):
  rng = np.random.default_rng(0)
  img = lambda n: rng.integers(0, 256, (n, size, size, 1), np.uint8)
  return oneclass.OneClassData(
    name="tiny",
    normal=img(n_normal),
    unlabeled=img(n_unlabeled),
    unlabeled_labels=np.zeros(n_unlabeled, np.int32),
    test=img(8),
    test_labels=np.array([0] * 4 + [1] * 4, np.int32),
    test_names=tuple(str(i) for i in range(8)),
  )


class LossAndScoreTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    self.out2 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    self.att = rng.dirichlet(np.ones(5), size=3).astype(np.float32)

  def loss(self, out, att, backbone):
    return jax.jit(
      functools.partial(
        ensembles.reconstruction_loss, backbone=backbone, entropy_weight=0.0002
      )
    )(out, self.x, att)

  def test_ae_loss(self):
    out = self.out2[..., :1]
    np.testing.assert_allclose(
      self.loss(out, None, "ae"), np.mean((out - self.x) ** 2), rtol=1e-5
    )

  def test_aeu_loss(self):
    mu, s = self.out2[..., :1], self.out2[..., 1:]
    want = np.mean(np.exp(-s) * (mu - self.x) ** 2) + np.mean(s)
    np.testing.assert_allclose(
      self.loss(self.out2, None, "aeu"), want, rtol=1e-5
    )

  def test_memae_loss(self):
    out = self.out2[..., :1]
    entropy = -np.sum(self.att * np.log(self.att + 1e-12), -1).mean()
    want = np.mean((out - self.x) ** 2) + 0.0002 * entropy
    np.testing.assert_allclose(
      self.loss(out, self.att, "memae"), want, rtol=1e-5
    )

  @parameterized.parameters("ae", "aeu")
  def test_discrepancy_maps(self, backbone):
    rng = np.random.default_rng(1)
    ndm = rng.normal(size=(3, 2, 4, 4, 2)).astype(np.float32)
    udm = rng.normal(size=(3, 2, 4, 4, 2)).astype(np.float32)
    x = rng.uniform(-1, 1, (2, 4, 4, 1)).astype(np.float32)
    if backbone == "ae":
      ndm, udm = ndm[..., :1], udm[..., :1]
    got = jax.jit(
      functools.partial(ensembles.discrepancy_maps, backbone=backbone)
    )(ndm, udm, x)
    mu_b, mu_a = ndm[..., 0].mean(0), udm[..., 0].mean(0)
    var = (
      np.exp(ndm[..., 1]).mean(0) if backbone == "aeu" else np.ones_like(mu_b)
    )
    std_unbiased = np.std(ndm[..., 0], axis=0, ddof=1)
    np.testing.assert_allclose(
      got["rec"], (x[..., 0] - mu_b) ** 2 / var, rtol=1e-4
    )
    np.testing.assert_allclose(
      got["intra"], std_unbiased / np.sqrt(var), rtol=1e-4
    )
    np.testing.assert_allclose(
      got["inter"], np.abs(mu_a - mu_b) / np.sqrt(var), rtol=1e-4, atol=1e-6
    )

  def test_to_unit_range(self):
    np.testing.assert_allclose(
      resident.to_unit_range(jnp.array([0, 255], jnp.uint8)), [-1.0, 1.0]
    )


class SamplingTest(absltest.TestCase):
  def test_each_epoch_is_a_permutation_and_members_differ(self):
    keys = jax.random.split(jax.random.key(0), 2)
    sample = jax.jit(resident.sample_indices, static_argnums=(0, 3))

    def epoch(key, e):
      return np.concatenate([sample(18, 3 * e + s, key, 6) for s in range(3)])

    first = epoch(keys[0], 0)
    self.assertEqual(sorted(first), list(range(18)))  # never 18, 19
    self.assertFalse(np.array_equal(first, epoch(keys[0], 1)))
    self.assertFalse(np.array_equal(first, epoch(keys[1], 0)))
    np.testing.assert_array_equal(first, epoch(keys[0], 0))


def first_phase(config, mesh):
  """The jitted "ensembles" phase of tiny_config on tiny_data."""
  return loop.compile_phases(METHOD.phases(config, tiny_data()), mesh, 1)[0]


def run_steps(config, mesh, num_steps=2):
  """(params, batch_stats, [metrics per step]) on the host."""
  state = loop.place(METHOD.init_state(config), mesh)
  phase = first_phase(config, mesh)
  history = []
  with jax.set_mesh(mesh):
    for _ in range(num_steps):
      state, metrics = phase.step_fn(state, phase.inputs)
      history.append(metrics)
  return jax.device_get((state.params, state.batch_stats, history))


@functools.cache
def reference_run():
  """tiny_config's first 2 steps: one device, float32, members unrolled."""
  config = tiny_config()
  config.train.member_strategy = "unroll"
  return run_steps(config, sharding.make_mesh(config.mesh))


# ------------------------------------------- comparing two compiled programs
#
# Two programs that compute the same steps (sharded or not, vmap or unroll,
# K steps per call or one) round differently: XLA fuses and orders their
# reductions differently, and differently again on another CPU. What that
# may change follows from the maths, not from one machine:
#
# - A forward pass is continuous in its inputs, so from the same state the
#   losses and BatchNorm batch statistics of a step agree to float32
#   rounding: relative error ~ log2(N) * 2^-24 per reduction of N terms
#   (blocked summation), N <= 8192 here, over ~12 layers: ~1e-5.
# - A gradient is not: a pre-activation that rounding moves across a ReLU's
#   kink switches that unit's whole contribution on or off, and Adam turns
#   a gradient at rounding level into a full +-lr step (its first update is
#   lr * sign(g); with beta1 = 0.5 later ones are nearly so). After an update
#   the parameters may therefore differ by up to Adam's per-step bound
#   (`adam_step_bound`) in a few weights, and losses of *later* steps by
#   the first-order effect of those weights, g . dtheta, which is small
#   because the weights that flip are the ones whose gradient is ~0.
#
# So each comparison starts both programs from the same state and runs one
# call: the step counters must be equal, every loss of the call and (after
# one step) the batch statistics tightly, the parameters within Adam's
# bound. Two starting points, a fresh state and one 2 steps in, check that a
# call draws the batches of the global steps it runs (see
# `test_parity_catches_a_wrong_batch_or_a_skipped_step`). Over many steps
# the flips compound into a divergent trajectory, as with any two runs that
# differ in rounding, so nothing is compared after several calls.

LOSS_RTOL = 1e-5  # forward pass, the same state: rounding only
# A loss of the 2nd step of a call follows an update that may differ by
# Adam's flips; g . dtheta over the flipped weights stays well below this
# (measured <= 1e-7 relative; 8e-5 after flips compounded over 2 calls).
LATER_LOSS_RTOL = 1e-3
STATS_RTOL, STATS_ATOL = 1e-4, 1e-6  # BN statistics after one step
# The gradient norm jumps when a ReLU unit flips (its share of a layer's
# gradient is one of B*H*W >= 32 positions); a weak check by design.
GRAD_NORM_RTOL = 5e-2


def adam_step_bound(b1: float, b2: float, t: int) -> float:
  """max |m_hat_t / (sqrt(v_hat_t) + eps)| over all gradient sequences.

  With m_t = (1-b1) sum_i b1^(t-i) g_i and v_t = (1-b2) sum_i b2^(t-i) g_i^2,
  Cauchy-Schwarz gives |m_t| <= sqrt(sum_i (1-b1)^2 b1^(2(t-i)) /
  ((1-b2) b2^(t-i))) sqrt(v_t); bias correction and eps >= 0 then bound
  Adam's t-th update (Kingma & Ba 2015, Alg. 1) by lr times this. t = 1
  gives 1 (the update is lr * sign(g)).
  """
  ratio = sum((b1 * b1 / b2) ** j for j in range(t))
  return (1 - b1) / (1 - b1**t) * np.sqrt((1 - b2**t) / (1 - b2) * ratio).item()


def host(tree):
  return jax.device_get(tree)


def on_mesh(state, mesh):
  """A host copy of `state`, replicated over `mesh` (a step donates it)."""
  return loop.place(state, mesh)


@functools.cache
def start_states():
  """Host copies of a fresh tiny_config state and of the state 2 single
  steps later (one device, members unrolled): both programs of a parity
  test start from exactly these."""
  config = tiny_config()
  config.train.member_strategy = "unroll"
  mesh = sharding.make_mesh(config.mesh)
  state = loop.place(METHOD.init_state(config), mesh)
  phase = first_phase(config, mesh)
  fresh = host(state)
  with jax.set_mesh(mesh):
    for _ in range(2):
      state, _ = phase.step_fn(state, phase.inputs)
  return fresh, host(state)


def single_steps(config, num_steps=1):
  """start (host state) -> (host state, metrics averaged over the steps)
  of `num_steps` calls of the single-step program of `config`'s mesh."""
  mesh = sharding.make_mesh(config.mesh)
  phase = first_phase(config, mesh)

  def call(start):
    state, history = on_mesh(start, mesh), []
    with jax.set_mesh(mesh):
      for _ in range(num_steps):
        state, metrics = phase.step_fn(state, phase.inputs)
        history.append(metrics)
    history = host(history)
    mean = {k: np.mean([m[k] for m in history]) for k in history[0]}
    return host(state), mean

  return call


class TrainStepTest(parameterized.TestCase):
  def assert_same_call(self, call_a, call_b, num_steps):
    """call_a and call_b, from each start state, ran the same steps."""
    o = tiny_config().optim
    for start in start_states():
      (a, metrics_a), (b, metrics_b) = call_a(start), call_b(start)
      first = int(start.step)
      self.assertEqual(int(a.step), first + num_steps)
      self.assertEqual(int(b.step), first + num_steps)
      self.assertEqual(set(metrics_a), set(metrics_b))
      for k, want in metrics_a.items():
        if "loss" in k:
          rtol = LOSS_RTOL if num_steps == 1 else LATER_LOSS_RTOL
        else:
          rtol = GRAD_NORM_RTOL
        np.testing.assert_allclose(
          metrics_b[k], want, rtol=rtol, err_msg=f"{k} from step {first}"
        )
      if num_steps == 1:
        jax.tree.map(
          functools.partial(
            np.testing.assert_allclose, rtol=STATS_RTOL, atol=STATS_ATOL
          ),
          b.batch_stats,
          a.batch_stats,
        )
      # Two runs from one state differ by at most both runs' largest steps.
      bound = (
        2
        * o.lr
        * sum(
          adam_step_bound(o.b1, o.b2, t)
          for t in range(first + 1, first + num_steps + 1)
        )
      )
      for pa, pb in zip(
        jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True
      ):
        self.assertLessEqual(float(np.max(np.abs(pa - pb))), bound * 1.001)

  def test_members_differ_and_loss_is_finite(self):
    params, _, history = reference_run()
    kernel = params["ndm"]["enc_fc1"]["kernel"]
    self.assertEqual(kernel.shape[0], 2)
    self.assertFalse(np.allclose(kernel[0], kernel[1]))
    self.assertFalse(
      np.allclose(
        params["ndm"]["enc_fc1"]["kernel"], params["udm"]["enc_fc1"]["kernel"]
      )
    )
    for metrics in history:
      for v in metrics.values():
        self.assertTrue(np.isfinite(v))

  def test_unroll_and_vmap_agree(self):
    unroll, vmap = tiny_config(), tiny_config()
    unroll.train.member_strategy = "unroll"
    vmap.train.member_strategy = "vmap"
    self.assert_same_call(single_steps(unroll), single_steps(vmap), 1)

  def test_sharded_step_matches_single_device(self):
    self.assertEqual(jax.device_count(), 8, "conftest fakes 8 CPU devices")
    single, sharded = tiny_config(), tiny_config()
    sharded.mesh.data = 8
    for c in (single, sharded):
      c.train.member_strategy = "unroll"
    self.assert_same_call(single_steps(single), single_steps(sharded), 1)

  def multi_step_call(self, config, num_steps, repeat=loop.repeat_steps):
    """The scanned K-step program of GPU/TPU (CPU unrolls the same steps)."""
    mesh = sharding.make_mesh(config.mesh)
    phase = first_phase(config, mesh)
    # The step as the loop jits it, unwrapped: a jit compiled with CPU
    # compiler options (block_barrier) cannot be nested in another jit.
    step = phase.step_fn.__wrapped__
    multi = jax.jit(repeat(step, num_steps, unroll=False))

    def call(start):
      with jax.set_mesh(mesh):
        return host(multi(on_mesh(start, mesh), phase.inputs))

    return call

  def test_several_steps_per_call_match_single_steps(self):
    config = tiny_config()
    self.assert_same_call(
      single_steps(config, 2), self.multi_step_call(config, 2), 2
    )

  def test_parity_catches_a_wrong_batch_or_a_skipped_step(self):
    """The tolerances above still see a real difference in the steps."""

    def same_batch(step, num_steps, *, unroll):
      # Every inner step draws the batch of the call's first step.
      def run(state, inputs):
        first = state.step
        for i in range(num_steps):
          state, _ = step(state.replace(step=first), inputs)
          state = state.replace(step=first + i + 1)
        return state, _

      return run

    def skipped(step, num_steps, *, unroll):
      # One step run, the counter advanced by num_steps.
      def run(state, inputs):
        state, metrics = step(state, inputs)
        return state.replace(step=state.step + num_steps - 1), metrics

      return run

    config = tiny_config()
    for broken in (same_batch, skipped):
      with self.subTest(broken.__name__):
        with self.assertRaises(AssertionError):
          self.assert_same_call(
            single_steps(config, 2),
            self.multi_step_call(config, 2, repeat=broken),
            2,
          )

  def test_bfloat16_compute_trains_float32_parameters(self):
    config = tiny_config(compute_dtype="bfloat16")
    config.train.member_strategy = "unroll"
    params, stats, history = run_steps(config, sharding.make_mesh(config.mesh))
    for leaf in jax.tree.leaves((params, stats)):
      self.assertEqual(leaf.dtype, np.float32)
    for metrics in history:
      for v in metrics.values():
        self.assertTrue(np.isfinite(v))
    # The first loss, from the same parameters: bfloat16 keeps 8 mantissa
    # bits (relative rounding 2^-9 ~ 0.2%) and a forward pass rounds ~20
    # times in sequence, so the loss may move by a few percent, not more.
    # Later losses follow updates that differ in sign wherever bfloat16's
    # gradient error exceeds the gradient: only the first is compared.
    want = reference_run()[2][0]
    for k in ("ndm_loss", "udm_loss"):
      np.testing.assert_allclose(history[0][k], want[k], rtol=0.05)
      self.assertNotEqual(history[0][k], want[k])

  def test_batch_must_divide_devices(self):
    config = tiny_config()
    config.train.batch_size = 12
    config.mesh.data = 8
    with self.assertRaisesRegex(ValueError, "train.batch_size=12.*divisible"):
      first_phase(config, sharding.make_mesh(config.mesh))

  def test_too_few_normals(self):
    config = tiny_config()
    with self.assertRaisesRegex(ValueError, "fewer than one batch"):
      METHOD.phases(config, tiny_data(n_normal=4))

  def test_phase_lengths_follow_epochs_of_each_module(self):
    config = tiny_config()
    config.epochs = 3
    phases = METHOD.phases(config, tiny_data(16, 9))
    # NDM: 16 // 8 = 2 steps/epoch; UDM: 25 // 8 = 3 steps/epoch.
    self.assertEqual([p.num_steps for p in phases], [6, 3])


if __name__ == "__main__":
  absltest.main()
