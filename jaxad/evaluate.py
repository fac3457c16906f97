r"""Scores the test split with a trained state and writes WORKDIR/eval.json.

  python -m jaxad.evaluate --config configs/<method>.py --workdir W [--report]

restores the latest checkpoint in W (trained by `jaxad.train` with the same
config) and re-scores without training (`eval.target_specificity` may
differ from the trained run's; parts of the config the checkpoint lacks
are refused). Other data than the run's (another `data.*`) is scored into
W/eval_<data name>-<hash>/ instead of W, never over the run's results.
Writes:
* `W/eval.json`: {"dataset", "headline" (the method's headline score, its
  last), "num_normal", "num_abnormal", "scores": {name: {"auroc", "ap"}},
  "run" (`run_info.describe`: method, config hash, versions, commit,
  backend, devices, wall-clock per phase)}, plus "f1", "accuracy",
  "sensitivity", "specificity" at "decision_threshold" for a score with a
  fixed threshold (`api.Score.threshold`); for data with pixel masks
  (mvtec, bmad, mtd) every score also gets "pixel_auroc" and "aupro" (FPR
  limit 0.3) of its maps, bilinearly resized to the mask size if they differ;
  with calibration normals (`api.EvalData.calibration`), every score gets
  "calibrated": {"threshold", "target_specificity", "num_calibration",
  "calibration_specificity", "sensitivity", "specificity"}: the threshold
  chosen on the calibration normals' scores alone
  (`metrics.threshold_at_specificity`, never on the test set) and the test
  set's sensitivity and specificity there (abnormal = score > threshold);
* `W/eval_config.json`: the config it was scored with;
* `W/scores.npz`: per-image scores, labels and names;
* `W/calibration_scores.npz`: {score name: [NC] float32, "names": [NC]},
  the calibration normals' scores (a new image's percentile among them);
  absent without calibration normals;
* `W/maps.npz`: the pixel maps of every score, float16 [N, S, S];
* with --report, `W/report/` (jaxad.report: ROC curves, histograms, map
  overlays, index.html); without it, an earlier `W/report/` is removed, so
  no report describes another evaluation than eval.json.
"""

import os
import sys
import time

import jax
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging

from jaxad import (
  checkpoint,
  cli,
  configlib,
  metrics,
  report,
  restore,
  run_info,
  sharding,
  storage,
  workdir_lock,
)
from jaxad.data import decode
from jaxad.methods import api
from jaxad.models import block_barrier

EVAL_CONFIG = "eval_config.json"


def score_fn(method: api.Method, config: mlc.ConfigDict, mesh):
  """The jitted `method.score(config, model, context, images)`.

  Replicated outputs, so that every host can fetch all scores.
  """
  return jax.jit(
    lambda model, context, images: method.score(config, model, context, images),
    out_shardings=sharding.replicated(mesh),
    compiler_options=block_barrier.compiler_options(),
  )


def check_scores(method: api.Method, config, model, data, mesh) -> None:
  """Traces `method.score` on one eval batch (no compute) and checks its
  output against `method.scores(config)`, and the eval config, before any
  training.

  Raises:
    ValueError: scores other than `scores()` lists, a map whose name is
      not a score, or a score that is not [B] / a map that is not 3-D;
      eval.target_specificity outside (0, 1]; calibration images shaped
      unlike the test images, or not as many names as images.
  """
  target = config.eval.target_specificity
  if not 0.0 < target <= 1.0:
    raise ValueError(
      f"config.eval.target_specificity={target}: must be in (0, 1]"
    )
  cal = data.calibration
  if cal.shape[1:] != data.test.shape[1:] or len(cal) != len(
    data.calibration_names
  ):
    raise ValueError(
      f"{data.name}: calibration images {cal.shape} with"
      f" {len(data.calibration_names)} names; test images are"
      f" {data.test.shape[1:]}"
    )
  names = [s.name for s in method.scores(config)]
  b = config.eval.batch_size
  images = jax.ShapeDtypeStruct((b, *data.test.shape[1:]), data.test.dtype)
  with jax.set_mesh(mesh):
    context = jax.eval_shape(
      lambda m: method.score_context(config, m, data), model
    )
    out = jax.eval_shape(
      lambda m, c, x: method.score(config, m, c, x), model, context, images
    )
  where = f"{type(method).__name__}.score"
  if set(out["scores"]) != set(names):
    raise ValueError(
      f"{where} returns scores {sorted(out['scores'])}, its "
      f"scores() lists {names}"
    )
  extra = sorted(set(out["maps"]) - set(names))
  if extra:
    raise ValueError(f"{where}: maps {extra} are not among its scores {names}")
  for k, v in out["scores"].items():
    if v.shape != (b,):
      raise ValueError(f"{where}: score {k!r} has shape {v.shape}, not ({b},)")
  for k, v in out["maps"].items():
    if v.ndim != 3 or v.shape[0] != b:
      raise ValueError(f"{where}: map {k!r} has shape {v.shape}, not [B,H,W]")


def score_images(score, model, context, images, batch_size: int, mesh):
  """Runs a jitted `score(model, context, images)` over [N, S, S, C] uint8
  images.

  The last batch is padded to the static batch size (one compile), and the
  padding is dropped from the results.

  Returns:
    {"scores": {name: [N]}, "maps": {name: [N, S, S]}} as numpy arrays.
  """
  n = len(images)
  sharding.check_batch(batch_size, mesh, "config.eval.batch_size")
  data_sharding = sharding.batch_sharded(mesh)
  chunks = []
  for start in range(0, n, batch_size):
    batch = images[start : start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    chunks.append(score(model, context, jax.device_put(batch, data_sharding)))
  host = jax.device_get(chunks)
  return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *host)


def evaluate(
  config: mlc.ConfigDict,
  workdir: str,
  method: api.Method,
  model: api.Model,
  data: api.EvalData,
  mesh,
  *,
  write_report: bool = False,
) -> dict:
  """Scores `data.test` and `data.calibration`, writes eval.json,
  scores.npz, calibration_scores.npz, maps.npz (and the visual report with
  `write_report`); returns the eval.json content."""
  check_scores(method, config, model, data, mesh)
  t_start = time.perf_counter()
  b = config.eval.batch_size
  with jax.set_mesh(mesh):
    context = method.score_context(config, model, data)
    score = score_fn(method, config, mesh)
    out = score_images(score, model, context, data.test, b, mesh)
    calibration = None
    if len(data.calibration):  # same function, context and batches
      calibration = score_images(
        score, model, context, data.calibration, b, mesh
      )["scores"]
  order = [s.name for s in method.scores(config)]
  labels = np.asarray(data.test_labels)
  result = {
    "dataset": data.name,
    "headline": order[-1],
    "num_normal": int(np.sum(labels == 0)),
    "num_abnormal": int(np.sum(labels == 1)),
    "scores": {
      k: metrics.image_metrics(out["scores"][k], labels) for k in order
    },
  }
  for s in method.scores(config):
    if s.threshold is not None:
      result["scores"][s.name] |= metrics.decision_metrics(
        out["scores"][s.name], labels, s.threshold
      )
  if data.test_masks is not None:
    for k, m in out["maps"].items():
      result["scores"][k] |= metrics.pixel_metrics(
        resize_maps(m, data.test_masks.shape[1:]), data.test_masks
      )
  if calibration is None:
    logging.warning(
      "%s: no calibration normals (config.eval.calibration_fraction=%s):"
      " eval.json has no calibrated decision threshold",
      data.name,
      config.eval.calibration_fraction,
    )
  else:  # the threshold sees the calibration scores only
    for k in order:
      result["scores"][k]["calibrated"] = metrics.calibrated_metrics(
        calibration[k],
        out["scores"][k],
        labels,
        config.eval.target_specificity,
      )
  result["run"] = run_info.describe(
    config, workdir, seconds={"evaluate": time.perf_counter() - t_start}
  )
  if jax.process_index() == 0:
    write_calibration_scores(workdir, calibration, data.calibration_names)
    storage.write_json(os.path.join(workdir, "eval.json"), result, indent=2)
    # The config this eval.json was scored with (a re-score may change the
    # scoring inputs, e.g. a support set): what jaxad.load/predict use, so
    # that their scores match the thresholds beside them.
    storage.write_text(
      os.path.join(workdir, EVAL_CONFIG), config.to_json(indent=2)
    )
    storage.write_npz(
      os.path.join(workdir, "scores.npz"),
      labels=labels,
      names=np.asarray(data.test_names),
      **out["scores"],
    )
    storage.write_npz(
      os.path.join(workdir, "maps.npz"),
      compressed=True,
      **{k: v.astype(np.float16) for k, v in out["maps"].items()},
    )
  logging.info("Results on %s:\n%s", data.name, format_table(result))
  if write_report and jax.process_index() == 0:
    path = report.write(
      workdir,
      result,
      data,
      out["scores"],
      out["maps"],
      method.scores(config),
      config,
    )
    logging.info("Report written to %s/index.html", path)
  elif (
    jax.process_index() == 0
    and (report_dir := storage.path(os.path.join(workdir, "report"))).is_dir()
  ):
    # A report beside a newer eval.json would show other numbers.
    report_dir.rmtree()
    logging.warning(
      "Removed the previous %s: it showed another evaluation (pass"
      " --report to write one for this)",
      report_dir,
    )
  return result


CALIBRATION_SCORES = "calibration_scores.npz"


def write_calibration_scores(
  workdir: str, scores: dict[str, np.ndarray] | None, names
) -> None:
  """W/calibration_scores.npz: {score name: [NC] float32, "names": [NC]
  str}; without calibration scores (None), removes a stale one."""
  path = os.path.join(workdir, CALIBRATION_SCORES)
  if scores is None:
    storage.path(path).unlink(missing_ok=True)
    return
  storage.write_npz(
    path,
    names=np.asarray(names, dtype=str),
    **{k: np.asarray(v, np.float32) for k, v in scores.items()},
  )


def without_run(result: dict) -> dict:
  """eval.json without its "run" record (wall-clock, commit): what two
  evaluations of the same checkpoint and data have equal."""
  return {k: v for k, v in result.items() if k != "run"}


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[N, h, w] maps -> [N, H, W] (`size`), bilinear with half-pixel centres.

  Shrinking is antialiased (jax.image.resize's default); maps already at
  `size` are returned as they are.
  """
  if maps.shape[1:] == tuple(size):
    return maps
  return np.asarray(
    jax.image.resize(
      np.asarray(maps, np.float32), (len(maps), *size), "bilinear"
    )
  )


def format_table(result: dict) -> str:
  """eval.json as a console table: AUROC, AP, pixel metrics, and the
  calibrated threshold with the test set's sensitivity/specificity."""
  scores = result["scores"].values()
  pixel = all("aupro" in m for m in scores)
  calibrated = bool(scores) and all("calibrated" in m for m in scores)
  header = f"{'score':<10} {'AUROC':>7} {'AP':>7}"
  header += f" {'pAUROC':>7} {'AUPRO':>7}" if pixel else ""
  header += f" {'threshold':>10} {'sens':>6} {'spec':>6}" if calibrated else ""
  lines = [header]
  names = list(result["scores"])
  if result.get("headline") in names:  # the headline score first
    names.remove(result["headline"])
    names.insert(0, result["headline"])
  for name in names:
    m = result["scores"][name]
    line = f"{name:<10} {m['auroc']:>7.4f} {m['ap']:>7.4f}"
    if pixel:
      line += f" {m['pixel_auroc']:>7.4f} {m['aupro']:>7.4f}"
    if calibrated:
      c = m["calibrated"]
      line += (
        f" {c['threshold']:>10.4g} {c['sensitivity']:>6.3f}"
        f" {c['specificity']:>6.3f}"
      )
    lines.append(line)
  lines.append(
    f"({result['num_normal']} normal / {result['num_abnormal']} "
    "abnormal test images)"
  )
  if calibrated:
    c = next(iter(scores))["calibrated"]
    lines.append(
      f"(threshold: target specificity {c['target_specificity']:g} on"
      f" {c['num_calibration']} calibration normals, never the test set;"
      " sens/spec: test set, abnormal = score > threshold)"
    )
  if "run" in result:
    r = result["run"]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
    lines.append(
      f"({r['method']}, config {r['config_sha256'][:12]}, jaxad"
      f" {r['versions']['jaxad']} {r['commit'] or ''}, jax"
      f" {r['versions']['jax']} on {r['num_devices']} {r['backend']}"
      f" device(s); {seconds})"
    )
  return "\n".join(lines)


_REPORT = flags.DEFINE_bool(
  "report", False, "Also write W/report/ (ROC, histograms, map grid, HTML)."
)


# A config or data mistake (the message names the key or file): one line,
# exit 2.
@cli.user_errors(decode.DataError, FileNotFoundError)
def main(argv):
  del argv
  config, workdir = cli.CONFIG.value, cli.WORKDIR.value
  cli.setup_logging()
  sharding.initialize_distributed()
  try:
    method, model, mesh = restore.trained(config, workdir)
    with workdir_lock.hold(workdir, "jaxad.evaluate"):
      out = restore.output_dir(config, workdir)
      if out != workdir:
        storage.path(out).mkdir(parents=True, exist_ok=True)
        logging.warning(
          "Other data than the run's (%s): results go to %s, not over the "
          "run's eval.json",
          ", ".join(
            configlib.other_data_keys(config, restore.run_config(workdir))
          ),
          out,
        )
      data = method.load_data(config, out)
      if not len(data.test):
        print(
          f"error: {data.name} has no test images to evaluate",
          file=sys.stderr,
          flush=True,
        )
        sys.exit(2)
      evaluate(
        config, out, method, model, data, mesh, write_report=_REPORT.value
      )
  except (
    workdir_lock.WorkdirBusyError,
    checkpoint.UnreadableCheckpointError,
  ) as e:  # one line, as jaxad.train
    print(f"error: {e}", file=sys.stderr, flush=True)
    busy = isinstance(e, workdir_lock.WorkdirBusyError)
    sys.exit(workdir_lock.EXIT_BUSY if busy else 1)


if __name__ == "__main__":
  flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
