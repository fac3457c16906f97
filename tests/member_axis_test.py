"""DDAD's K members split over the mesh's `member` axis (jaxad/sharding.py).

One training step ("ensembles" phase: NDM and UDM, K=8 members each) of
each layout of 8 fake CPU devices must compute the single-device step (one
device, the same K, members vmapped):

  member=2 x data=4  members vmapped, 4 per member group, via the loop;
  member=1 x data=8  members vmapped, state placed by `tree_shardings`;
  member=8 x data=1  members unrolled (CPU's default), one per device,
                     state placed by `tree_shardings`.

K=8 so that 8 divides it; unrolling 8 members per module on one device
takes minutes to compile on a 2-core CPU, hence the vmapped reference
(tests/ddad_test.py checks that unroll and vmap agree).

The layouts run in a child process (`python tests/member_axis_test.py
--child`): XLA_FLAGS=--xla_force_host_platform_device_count=8 only counts
when set before JAX initialises, which a test cannot ensure in its own
process.

Placement. "tree_shardings": the state is placed as
`sharding.tree_shardings` says (the members split over `member`, as
`ensembles.init` placed them) and the jitted step keeps those shardings for
the new state, which the child checks: that is the loop once `loop.place`
and the steps' out_shardings use `tree_shardings`. "loop": today's
`loop.compile_phases`/`loop.place`, which replicate the state; each member
group still computes only its own members inside the step.

Tolerances (tests/ddad_test.py's, derived in its comment block). The
`member` axis alone changes no reduction within a member (a member's whole
step runs on its group); the metrics' mean and max over members become a
cross-device reduction of K terms. The `data` axis splits each member's
reductions over its batch (BatchNorm statistics, the loss mean, weight
gradients: N = B*H*W <= 8*16*16 = 2048 terms) into per-device partial sums
and an all-reduce. Both only reorder float32 additions: each reduction's
relative error is ~log2(N) * 2^-24 ~ 7e-7, compounded over ~12 layers
~1e-5, so the step's losses (LOSS_RTOL) and the BatchNorm statistics after
it (STATS_RTOL) are compared at that level. Gradients are not continuous (a
rounding-level change moves a pre-activation across a ReLU kink, and Adam's
first update is lr * sign(g)), so a parameter may differ by both runs'
largest Adam steps (2 lr * `adam_step_bound`), no more. A member that drew
another member's batch, or a member's parameters in another member's slot,
misses the loss tolerance or the parameter bound by orders of magnitude.
"""

import json
import os
import subprocess
import sys
import time
import unittest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

# (member, data, member strategy, placement)
LAYOUTS = (
  (2, 4, "vmap", "loop"),
  (1, 8, "vmap", "tree_shardings"),
  (8, 1, "unroll", "tree_shardings"),
)
K = 8  # members per module: divisible by every layout's member axis
IMAGE_SIZE = 16  # the smallest the AE takes: quick to compile


# ------------------------------------------------------------ child process


def _child() -> None:
  """Runs every layout; prints one JSON line per comparison."""
  sys.path[:0] = [REPO, TESTS]
  import functools

  import ddad_test as dt
  import jax
  import numpy as np

  from jaxad import loop, sharding
  from jaxad.methods.ddad import METHOD

  assert jax.device_count() == 8, jax.devices()

  def config(k, strategy, member, data):
    c = dt.tiny_config(num_members=k)
    c.data.image_size = IMAGE_SIZE
    c.train.member_strategy = strategy
    c.mesh.data = data
    c.mesh.member = member
    return c

  def first_phase(c):
    return METHOD.phases(c, dt.tiny_data(size=IMAGE_SIZE))[0]

  @functools.cache
  def template(k):
    """A fresh state (members split over a 1-device mesh's `member` axis,
    the split `tree_shardings` keeps on any mesh): one init per K, which
    takes longer to compile than the step."""
    return METHOD.init_state(config(k, "vmap", 1, 1))

  def member_split(state) -> bool:
    """Whether every ensemble leaf (parameters, statistics, Adam's moments
    and counts) is split over `member` on its leading axis."""
    return all(
      leaf.sharding.spec[:1] == (sharding.MEMBER_AXIS,)
      for tree in (state.params, state.batch_stats, state.opt_state)
      for leaf in jax.tree.leaves({m: tree[m] for m in ("ndm", "udm")})
    )

  def placed_step(c):
    """start (host state) -> (host state, host metrics, member_split): one
    step with the state placed and kept as `sharding.tree_shardings`."""
    mesh = sharding.make_mesh(c.mesh)
    shardings = sharding.tree_shardings(template(c.model.num_members), mesh)
    phase = first_phase(c)

    def step(state, inputs):
      new, metrics = phase.step_fn(state, inputs, state.step)
      return new.replace(step=state.step + 1), metrics

    fn, _ = loop.jit_steps(
      step,
      steps_per_call=1,
      out_shardings=(shardings, sharding.replicated(mesh)),
    )
    inputs = loop.place(phase.inputs, mesh)

    def call(start):
      with jax.set_mesh(mesh):
        new, metrics = fn(jax.device_put(start, shardings), inputs)
      return jax.device_get(new), jax.device_get(metrics), member_split(new)

    return call

  def loop_step(c):
    """The same step through the loop's compile_phases and place."""
    mesh = sharding.make_mesh(c.mesh)
    phase = loop.compile_phases([first_phase(c)], mesh, 1)[0]

    def call(start):
      with jax.set_mesh(mesh):
        new, metrics = phase.step_fn(loop.place(start, mesh), phase.inputs)
      return jax.device_get(new), jax.device_get(metrics), member_split(new)

    return call

  @functools.cache
  def start_states(k):
    """Host states: fresh, and 2 single-device steps in (vmap: unrolling
    K=8 members takes minutes to compile)."""
    c = config(k, "vmap", 1, 1)
    fresh = jax.device_get(template(k))
    call = placed_step(c)
    later = fresh
    for _ in range(2):
      later = call(later)[0]
    return (fresh, later), call

  def compare(ref, got, start, optim):
    """Max deviations, each as a fraction of its tolerance (<= 1 passes)."""
    (a, ma, _), (b, mb, _) = ref, got
    first = int(start.step)
    assert int(a.step) == int(b.step) == first + 1, (a.step, b.step)
    assert set(ma) == set(mb), (set(ma), set(mb))
    out = {}
    for key, want in ma.items():
      rtol = dt.LOSS_RTOL if "loss" in key else dt.GRAD_NORM_RTOL
      out[key] = float(abs(mb[key] - want) / (rtol * abs(want)))
    out["batch_stats"] = max(
      float(np.max(np.abs(x - y) / (dt.STATS_ATOL + dt.STATS_RTOL * np.abs(y))))
      for x, y in zip(
        jax.tree.leaves(b.batch_stats),
        jax.tree.leaves(a.batch_stats),
        strict=True,
      )
    )
    bound = 2 * optim.lr * dt.adam_step_bound(optim.b1, optim.b2, first + 1)
    out["params"] = max(
      float(np.max(np.abs(x - y))) / bound
      for x, y in zip(
        jax.tree.leaves(b.params), jax.tree.leaves(a.params), strict=True
      )
    )
    return out

  starts, ref_call = start_states(K)
  for member, data, strategy, placement in LAYOUTS:
    c = config(K, strategy, member, data)
    call = {"loop": loop_step, "tree_shardings": placed_step}[placement](c)
    for start in starts:
      got = call(start)
      record = dict(
        member=member,
        data=data,
        strategy=strategy,
        placement=placement,
        start_step=int(start.step),
        member_split=got[2],
        ratios=compare(ref_call(start), got, start, c.optim),
      )
      print("RESULT " + json.dumps(record), flush=True)


# ------------------------------------------------------------------- tests


class MemberAxisTest(unittest.TestCase):
  def test_layouts_match_the_single_device_step(self):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    start = time.perf_counter()
    proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--child"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    elapsed = time.perf_counter() - start
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    records = [
      json.loads(line[len("RESULT ") :])
      for line in proc.stdout.splitlines()
      if line.startswith("RESULT ")
    ]
    # Every layout, from both start states.
    self.assertEqual(len(records), 2 * len(LAYOUTS), proc.stdout)
    self.assertEqual(
      {(r["member"], r["data"]) for r in records},
      {layout[:2] for layout in LAYOUTS},
    )
    for r in records:
      name = (
        f"member={r['member']} x data={r['data']} ({r['strategy']}, "
        f"{r['placement']}) from step {r['start_step']}"
      )
      with self.subTest(name):
        for what, ratio in r["ratios"].items():
          self.assertLessEqual(ratio, 1.0, f"{what} in {name}: {r}")
        if r["placement"] == "tree_shardings":
          # The new state's ensembles stay split over `member`.
          self.assertTrue(r["member_split"], name)
    print(f"member-axis layouts: {elapsed:.0f} s", file=sys.stderr)


class MemberChecksTest(unittest.TestCase):
  """Refusals before compute (no devices needed)."""

  def test_members_must_divide_over_the_member_axis(self):
    import ml_collections as mlc

    from jaxad import sharding

    with self.assertRaisesRegex(
      ValueError,
      r"config\.model\.num_members=3 must be divisible by "
      r"config\.mesh\.member=2",
    ):
      sharding.check_members(
        3, mlc.ConfigDict({"data": -1, "member": 2}), "config.model.num_members"
      )
    sharding.check_members(
      4, mlc.ConfigDict({"data": -1, "member": 2}), "config.model.num_members"
    )

  def test_ddad_refuses_before_compute(self):
    sys.path[:0] = [TESTS]
    import ddad_test as dt

    from jaxad.methods.ddad import METHOD

    c = dt.tiny_config(num_members=3)
    c.mesh.member = 2
    for fn in (METHOD.init_state, lambda c: METHOD.phases(c, dt.tiny_data())):
      with self.assertRaisesRegex(
        ValueError, "num_members=3 must be divisible by config.mesh.member=2"
      ):
        fn(c)

  def test_mesh_shape(self):
    import ml_collections as mlc

    from jaxad import sharding

    def shape(**mesh):
      return sharding.mesh_shape(mlc.ConfigDict(mesh), 8)

    self.assertEqual(shape(data=-1), (1, 8))  # no member key: 1
    self.assertEqual(shape(data=-1, member=2), (2, 4))
    self.assertEqual(shape(data=1, member=8), (8, 1))
    self.assertEqual(shape(data=2, member=2), (2, 2))  # 4 of the 8
    with self.assertRaisesRegex(ValueError, r"config\.mesh\.member=3"):
      shape(data=-1, member=3)
    with self.assertRaisesRegex(
      ValueError, r"config\.mesh\.member=2 x config\.mesh\.data=3"
    ):
      shape(data=3, member=2)


if __name__ == "__main__":
  if sys.argv[1:] == ["--child"]:
    _child()
  else:
    unittest.main()
