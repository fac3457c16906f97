"""The method contract: what a method provides, and what it may rely on.

This module is the only interface between a method (DDAD, Multi-AD, ...) and
the shared code: `jaxad.train`, `jaxad.evaluate`, `jaxad.bench`,
`jaxad.report` and the training loop talk to a method through a `Method`
object and nothing else. A method is a package `jaxad/methods/<name>/`
whose `METHOD` attribute satisfies the `Method` protocol; `config.method`
names the package, and `jaxad.methods.get(name)` returns the object after
checking that it has every member below.

Division of labour
------------------
The method owns its maths: networks, losses, one training step, scoring.
The shared code owns everything around it:

* jit, donation of the state, shardings (the state and `Phase.inputs`
  replicated, batches split over the mesh's `data` axis), several steps per
  jitted call (`train.steps_per_call`), the global step counter;
* checkpoints (every `TrainState` field except `frozen`), resumption,
  logging, NaN checks, progress and throughput;
* evaluation: batching and padding the test images, metrics (AUROC, AP,
  pixel AUROC, AUPRO), eval.json, scores.npz, maps.npz and the report.

Adding a method
---------------
1. A package `jaxad/methods/<name>/` whose `__init__.py` defines `METHOD`
   (subclass `Defaults` for the optional members), and `<name>` in
   `jaxad.methods.NAMES`.
2. `configs/<name>.py` with `get_config(arg)` and a `:smoke` argument: the
   conformance test (tests/conformance_test.py) then runs the whole
   contract on it. The shared code reads these keys: `method`, `seed`,
   `epochs` (only in messages), `mesh.{data, member}`, `eval.{batch_size,
   calibration_fraction, target_specificity}`,
   `train.{batch_size, log_every, checkpoint_every, steps_per_call}`,
   `data.{image_size, channels, cache_dir}` (bench, default loader) and
   whatever `data.*` the method's `load_data` reads.
3. Golden tests of the maths against the original code where it exists.

A step function updates a network with `jaxad.methods.updates` (the one
loss -> gradients -> optimizer -> parameters).

Lifecycle of a run
------------------
1. `check_config(config)`: refuse an impossible config before anything is
   written to the workdir, any data is read or anything is compiled
   (within a second): `jaxad.config_checks.check_shared` (epochs, batch
   sizes, learning rates, fractions, data.format / data.root), then the
   method's own keys (e.g. the image sizes its networks can take). Raise
   `config_checks.ConfigError` (a ValueError) or `ConfigPathError` (a
   FileNotFoundError) naming the key, the value and what is allowed; the
   `config_checks.config_errors` decorator turns a check's other
   ValueError/FileNotFoundError into these, which the CLI prints as one
   line.
2. `load_data(config, workdir)`: the run's data; it must provide the
   `EvalData` fields. Default: `jaxad.data.oneclass.load`. Its
   `calibration` images are normals held out from training (a seeded
   `eval.calibration_fraction` of the known normals, recorded in
   W/split.json): never trained on and never test images, they set the
   decision threshold at `eval.target_specificity` (step 6).
3. `init_state(config)`: a fresh `TrainState` on the host or any device;
   the loop places it. It must be a pure function of the config (same
   config, same bits), so the `frozen` networks it rebuilds on every start
   are those the run trained with.
4. `phases(config, data)`: the training phases, run back to back; each
   step function is raw (not jitted) and pure. The loop increments
   `state.step` after every step; a step function returns the state with
   its networks updated and a dict of scalar metrics (names with "loss"
   are printed). A batch a step draws from resident `inputs` must pass
   through `shard_batch`, or every device computes the whole batch.
   `Phase.derive` adds resident inputs computed once per run from the
   placed state before the phase's first step (e.g. a frozen network's
   features of a resident pool). `jaxad.bench` calls it on the method's
   own `synthetic_data`.
5. `score_context(config, model, data)`: anything scoring needs that is
   computed once per evaluation (e.g. support-set or text features);
   default None.
6. `score(config, model, context, images)`: pure, jitted by the caller;
   `images` are uint8 [B, S, S, C] as the data layer decodes them. It sees
   a `Model` (parameters, BatchNorm statistics, frozen networks), never
   optimizer state: this is the function predict/export wrap. It returns
   exactly the scores `scores(config)` lists, and maps only under those
   names; `jaxad.evaluate.check_scores` traces it before training starts.
   Evaluation scores `data.test` and `data.calibration` with it (same
   context); the calibration scores alone choose each score's threshold
   (eval.json "calibrated", W/calibration_scores.npz): the test set never
   does.

Everything that can refuse a run (`check_config`, batch sizes against the
mesh, `load_data`, `phases`, the score's names) runs before the workdir's
config.json is written, so a corrected command can re-use the workdir.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import flax
import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxad import config_checks

Array = jax.Array
Config = mlc.ConfigDict
DATA_AXIS = "data"


# ------------------------------------------------------------------- scores


@dataclasses.dataclass(frozen=True)
class Score:
  """One score a method reports (a key of eval.json's "scores").

  `description` is one line for the report and results table, and says how
  the image score is reduced from the map (e.g. "spatial mean").
  `threshold`: a fixed decision threshold the method's paper reports at
  (e.g. 0.5 on a probability); eval.json then adds F1, accuracy,
  sensitivity and specificity there (`metrics.decision_metrics`).
  """

  name: str
  description: str
  threshold: float | None = None


ScoreOutput = dict[str, dict[str, Array]]  # {"scores": {..}, "maps": {..}}


# ---------------------------------------------------------------- the state


@flax.struct.dataclass
class TrainState:
  """The one train-state layout of every method.

  Every dict is keyed by network name (e.g. "ndm", "student"). Leaves may
  carry a leading member axis (ensembles). `frozen` holds networks that are
  never differentiated, updated or checkpointed (a pretrained teacher):
  {name: {"params": tree, "batch_stats": tree}}; `init_state` rebuilds them
  identically every time. `graphdefs` ({name: nnx.GraphDef}, trained and
  frozen) is static: part of the compiled program, not of the checkpoint.
  Optimizers are not in the state: a method builds them from the config
  (same config, same optimizer) for `init_state` and its step functions.
  """

  step: Array  # int32 scalar: global step over all phases
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: dict[str, Any]
  frozen: dict[str, Any]
  graphdefs: flax.core.FrozenDict = flax.struct.field(pytree_node=False)

  def model(self) -> "Model":
    """The state without optimizer moments and step: what scoring sees."""
    return Model(
      params=self.params,
      batch_stats=self.batch_stats,
      frozen=self.frozen,
      graphdefs=self.graphdefs,
    )


@flax.struct.dataclass
class Model:
  """Trained and frozen networks, enough to score (no optimizer state)."""

  params: dict[str, Any]
  batch_stats: dict[str, Any]
  frozen: dict[str, Any]
  graphdefs: flax.core.FrozenDict = flax.struct.field(pytree_node=False)

  def net(self, name: str) -> nnx.Module:
    """Network `name` (trained or frozen) with its parameters and stats."""
    if name in self.frozen:
      f = self.frozen[name]
      return nnx.merge(self.graphdefs[name], f["params"], f["batch_stats"])
    return nnx.merge(
      self.graphdefs[name],
      self.params[name],
      self.batch_stats.get(name, {}),
    )


def new_state(
  *,
  params: dict,
  batch_stats: dict,
  opt_state: dict,
  graphdefs: Mapping[str, Any],
  frozen: dict | None = None,
) -> TrainState:
  """A step-0 `TrainState`."""
  return TrainState(
    step=np.zeros((), np.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    frozen=frozen or {},
    graphdefs=flax.core.freeze(dict(graphdefs)),
  )


def shard_batch(x: Array) -> Array:
  """Constrains a batch drawn inside a step to be split over `data`.

  The loop traces steps under the run's mesh, so a bare PartitionSpec
  names its axis.
  """
  return jax.lax.with_sharding_constraint(x, PartitionSpec(DATA_AXIS))


# ------------------------------------------------------------------- phases

StepFn = Callable[[TrainState, Any, Array], tuple[TrainState, dict]]


@dataclasses.dataclass(frozen=True)
class Phase:
  """`num_steps` steps of `step_fn(state, inputs, local_step)`.

  `local_step` is the step within this phase (int32, from 0), for data
  order and noise; `state.step` is the global step. Exactly one of:
  * `inputs`: a pytree of arrays placed once, replicated, and passed to
    every step (device-resident datasets, PRNG keys); such phases run
    `train.steps_per_call` steps per jitted call;
  * `batches(first_step)`: a host iterator of per-step pytrees starting at
    phase-local step `first_step` (so a resumed run continues where it
    stopped); it must yield `num_steps - first_step` batches whose every
    leaf has a leading axis of `batch_size`; the loop places each one
    split over `data`, one step per call.

  `batch_size` (the images a step draws, checked against the mesh under
  the config key `batch_key`) and `members` (networks trained per image,
  >1 for ensembles) give the logged throughput.

  `derive(state, inputs, mesh)`, optional with `inputs`: resident inputs
  computed once per run, before the phase's first step, from the placed
  state and inputs (e.g. a frozen network's features of a resident pool,
  so that no step recomputes them); a dict of arrays merged into `inputs`
  and kept replicated. It must read only what no step changes (frozen
  networks, inputs): a resumed run derives them again.
  """

  name: str
  num_steps: int
  step_fn: StepFn
  batch_size: int
  batch_key: str
  inputs: Any = None
  batches: Callable[[int], Iterator[Any]] | None = None
  members: int = 1
  derive: Callable[[TrainState, Any, Mesh], dict[str, Array]] | None = None


def check_batches(
  num: int, batch_size: int, *, what: str, key: str, minimum: int = 1
) -> None:
  """Raises ConfigError (a ValueError, printed as one line by the CLI)
  unless `num` images fill a batch of `batch_size` (and hold at least
  `minimum`): named by `what` (e.g. "kermany: known normals") and the
  config `key` of the batch size."""
  if num < max(batch_size, minimum):
    raise config_checks.ConfigError(
      f"{what}: {num} images, fewer than one batch (config.{key}="
      f"{batch_size}{f', at least {minimum}' if minimum > 1 else ''})"
    )


# ----------------------------------------------------------------- the data


@runtime_checkable
class EvalData(Protocol):
  """What evaluation reads of a method's data (OneClassData has it).

  `calibration`: held-out normals (never trained on, never test images)
  whose scores alone set the threshold at `eval.target_specificity`;
  [0, S, S, C] with `eval.calibration_fraction=0` (no threshold then).
  """

  name: str
  test: np.ndarray  # [N, S, S, C] uint8
  test_labels: np.ndarray  # [N] int, 0 normal / 1 abnormal
  test_names: tuple[str, ...]
  test_masks: np.ndarray | None  # [N, H, W] bool, or None
  calibration: np.ndarray  # [NC, S, S, C] uint8 held-out normals
  calibration_names: tuple[str, ...]  # the NC names, in order


# --------------------------------------------------------------- the method


@runtime_checkable
class Method(Protocol):
  """A method's `METHOD` object: every member below must exist; `Defaults`
  implements the optional ones (check_config, trains, resumable_changes,
  rescoring_changes, check_scoring_data, load_data, synthetic_data,
  score_context)."""

  def check_config(self, config: Config) -> None:
    """Raises `config_checks.ConfigError` / `ConfigPathError` naming the
    key, the value and what is allowed; reads no data, writes nothing."""

  def trains(self, config: Config) -> bool:
    """False when `init_state` alone is the model scored (a zero-shot
    baseline, imported weights): `jaxad.train` then only evaluates and
    `jaxad.evaluate` needs no checkpoint."""

  def resumable_changes(self, stored: dict[str, Any]) -> tuple[str, ...]:
    """Config-key prefixes that may differ from a stored run's flattened
    config (`stored`) when resuming it, e.g. a stage not trained yet."""

  def rescoring_changes(self) -> tuple[str, ...]:
    """Config-key prefixes `jaxad.evaluate` may change against the trained
    run's config: inputs of scoring, not weights (e.g. a support set)."""

  def check_scoring_data(self, config: Config, trained: dict[str, Any]) -> None:
    """Refuses scoring data that the trained run makes invalid, before any
    data is read: `trained` is the run's flattened config (e.g. D²4FAD: a
    target dataset the run trained on). Raises `config_checks.ConfigError`
    naming the key (printed as one line)."""

  def load_data(self, config: Config, workdir: str) -> EvalData:
    """The run's data (may record its split in the workdir)."""

  def synthetic_data(self, config: Config, num_images: int) -> EvalData:
    """Seeded random data shaped like `load_data`'s, for `jaxad.bench`."""

  def init_state(self, config: Config) -> TrainState:
    """A fresh state; a pure function of the config."""

  def phases(self, config: Config, data: EvalData) -> list[Phase]:
    """The training phases with raw step functions, run in order."""

  def scores(self, config: Config) -> tuple[Score, ...]:
    """The scores `score` returns, from the simplest (e.g. a baseline) to
    the method's headline score, which is last (e.g. DDAD's refined or
    inter-discrepancy score): eval.json records it as "headline" and the
    results table shows it first."""

  def score_context(self, config: Config, model: Model, data: EvalData) -> Any:
    """Computed once per evaluation and passed to every `score` call."""

  def score(
    self, config: Config, model: Model, context: Any, images: Array
  ) -> ScoreOutput:
    """{"scores": {name: [B]}, "maps": {name: [B, S, S]}} of uint8
    images [B, S, S, C]; maps may be {} for methods without maps."""


REQUIRED = tuple(
  name
  for name in vars(Method)
  if not name.startswith("_") and callable(getattr(Method, name))
)


def check_method(method: Any, name: str) -> None:
  """Raises TypeError naming every contract member `method` lacks."""
  missing = [m for m in REQUIRED if not callable(getattr(method, m, None))]
  if missing:
    raise TypeError(
      f"jaxad.methods.{name}.METHOD does not implement the method contract "
      f"(jaxad/methods/api.py): missing {missing}"
    )


class Defaults:
  """The optional members' defaults; a method may subclass it."""

  def check_config(self, config: Config) -> None:
    """The checks every method shares (`jaxad.config_checks.check_shared`):
    a method that overrides this calls them too."""
    from jaxad import config_checks

    config_checks.check_shared(
      config, trains=self.trains(config), method=config.method
    )

  def trains(self, config: Config) -> bool:
    del config
    return True

  def resumable_changes(self, stored: dict[str, Any]) -> tuple[str, ...]:
    del stored
    return ()

  def rescoring_changes(self) -> tuple[str, ...]:
    return ()

  def check_scoring_data(self, config: Config, trained: dict[str, Any]) -> None:
    del config, trained  # any data.* change is scoring other data

  def load_data(self, config: Config, workdir: str) -> EvalData:
    """The one-class data of `config.data` (jaxad.data.oneclass), with
    `eval.calibration_fraction` of the known normals held out."""
    from jaxad.data import oneclass  # tfds/grain only when data is loaded

    return oneclass.load(config.data, workdir, config.eval.calibration_fraction)

  def score_context(self, config: Config, model: Model, data: EvalData) -> Any:
    del config, model, data
    return None

  def synthetic_data(self, config: Config, num_images: int) -> EvalData:
    """Seeded random one-class data (`jaxad.data.oneclass.synthetic`)."""
    from jaxad.data import oneclass

    return oneclass.synthetic(config.data, num_images)
