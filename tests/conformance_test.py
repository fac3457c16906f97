"""Every method honours the contract (jaxad/methods/api.py) end to end.

Parametrised over every `configs/*.py` that has a `:smoke` argument: a new
method gets these checks by adding its config. Each runs in-process on the
8 fake CPU devices of conftest.
"""

import glob
import importlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from jaxad import bench, evaluate, loop, methods, restore, sharding, train
from jaxad.methods import api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(name):
  """configs/<name>.py:smoke, or None if the config has no smoke argument."""
  module = importlib.import_module(f"configs.{name}")
  try:
    return module.get_config("smoke")
  except ValueError:  # configlib: unknown config argument
    return None


SMOKE_CONFIGS = [
  name
  for name in sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
  )
  if smoke_config(name) is not None
]


def data_roots(config) -> list[str]:
  """Every dataset path a config names (data.root, data.sources[*].root)."""
  roots = [config.data.get("root", "")]
  roots += [source["root"] for source in config.data.get("sources", [])]
  return [r for r in roots if r]


class ConformanceTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def workdir(self, name):
    return os.path.join(self.root, name)

  def test_every_method_package_is_listed_and_has_a_smoke_config(self):
    self.assertNotEmpty(SMOKE_CONFIGS)
    names = {smoke_config(p).method for p in SMOKE_CONFIGS}
    self.assertEqual(names, set(methods.NAMES))
    for name in methods.NAMES:
      self.assertIsInstance(methods.get(name), api.Method)
    with self.assertRaisesRegex(ValueError, "config.method='nope'"):
      methods.get("nope")

  @parameterized.parameters(*SMOKE_CONFIGS)
  def test_method_end_to_end(self, path):
    config = smoke_config(path)
    missing = [r for r in data_roots(config) if not os.path.exists(r)]
    if missing:  # a smoke config on the real sets in ../shared/data
      self.skipTest(f"{path}:smoke needs {missing} (../shared is absent)")
    config.data.cache_dir = self.workdir("cache")
    # Two of conftest's 8 fake devices: sharded like a multi-device run, at
    # a quarter of the partitioning overhead on a 2-core CI machine (the
    # step parity tests cover 8 devices).
    config.mesh.data = 2
    method = methods.get(config.method)
    method.check_config(config)
    infos = method.scores(config)
    names = [s.name for s in infos]
    self.assertLen(set(names), len(names))
    for s in infos:
      self.assertTrue(s.description.strip(), s.name)

    # Training, and an interrupted run resumed to the same eval.json.
    full = train.run(config, self.workdir("full"))
    self.assertEqual(list(full["scores"]), names)
    for m in full["scores"].values():
      self.assertTrue(0.0 <= m["auroc"] <= 1.0)
    with open(os.path.join(self.workdir("full"), "metrics.jsonl")) as f:
      record = json.loads(f.readline())
    self.assertGreater(record["images_per_s"], 0)
    data = method.load_data(config, self.workdir("full"))
    phases = method.phases(config, data)
    total = sum(p.num_steps for p in phases)
    stop = max(1, total // 2)

    def interrupt(step):
      if step == stop:
        raise KeyboardInterrupt

    with self.assertRaises(KeyboardInterrupt):
      train.run(config, self.workdir("resumed"), on_step=interrupt)
    resumed = train.run(config, self.workdir("resumed"))
    self.assertEqual(evaluate.without_run(resumed), evaluate.without_run(full))
    self.assertEqual(full["headline"], names[-1])
    run = full["run"]
    self.assertEqual(run["method"], config.method)
    self.assertEqual(run["versions"]["jax"], jax.__version__)
    self.assertLen(run["config_sha256"], 64)
    self.assertGreater(run["seconds"]["evaluate"], 0)

    # Evaluation of the checkpoint again: the same eval.json, and a report.
    _, model, mesh = restore.trained(config, self.workdir("full"))
    again = evaluate.evaluate(
      config,
      self.workdir("full"),
      method,
      model,
      data,
      mesh,
      write_report=True,
    )
    self.assertEqual(evaluate.without_run(again), evaluate.without_run(full))
    self.assertEqual(again["run"]["config_sha256"], run["config_sha256"])
    report = os.path.join(self.workdir("full"), "report")
    for name in ("roc.png", "histograms.png", "index.html"):
      self.assertTrue(os.path.isfile(os.path.join(report, name)), name)
    with open(os.path.join(report, "index.html")) as f:
      page = f.read()
    for s in infos:
      self.assertIn(s.name, page)

    # A changed config is refused in the same workdir, naming the key.
    changed = config.copy_and_resolve_references()
    changed.seed = config.seed + 1
    with self.assertRaisesRegex(ValueError, "seed"):
      train.run(changed, self.workdir("full"))

    # Frozen networks: rebuilt identically, untouched by a step of each phase.
    fresh = jax.device_get(method.init_state(config).frozen)
    jax.tree.map(np.testing.assert_array_equal, model.frozen, fresh)
    state = loop.place(method.init_state(config), mesh)
    with jax.set_mesh(mesh):
      for compiled in loop.compile_phases(phases, mesh, 1):
        p = compiled.phase
        batches = None if p.batches is None else p.batches(0)
        state, _ = compiled.step_fn(state, compiled.next_inputs(batches))
    jax.tree.map(np.testing.assert_array_equal, state.frozen, fresh)
    self.assertEqual(int(state.step), len(phases))

    # The benchmark runs every phase and the scoring step.
    result = bench.run(
      config, self.workdir("bench"), steps=1, repeats=1, warmup=0
    )
    self.assertEqual(
      [r["phase"] for r in result["train"]], [p.name for p in phases]
    )
    self.assertGreater(result["scoring"]["images_per_s"], 0)
    self.assertEqual(sharding.make_mesh(config.mesh).shape["data"], 2)


if __name__ == "__main__":
  absltest.main()
