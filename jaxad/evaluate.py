r"""Scores the test split with a trained state and writes WORKDIR/eval.json.

  python -m jaxad.evaluate --config configs/<method>.py --workdir W [--report]

restores the latest checkpoint in W (trained by `jaxad.train` with the same
config) and re-scores without training. Writes:
* `W/eval.json`: {"dataset", "num_normal", "num_abnormal",
  "scores": {name: {"auroc", "ap"}}}, plus "f1", "accuracy",
  "sensitivity", "specificity" at "decision_threshold" for a score with a
  fixed threshold (`api.Score.threshold`); for data with pixel masks
  (mvtec, bmad, mtd) every score also gets "pixel_auroc" and "aupro" (FPR
  limit 0.3) of its maps, bilinearly resized to the mask size if they differ;
* `W/scores.npz`: per-image scores, labels and names;
* `W/maps.npz`: the pixel maps of every score, float16 [N, S, S];
* with --report, `W/report/` (jaxad.report: ROC curves, histograms, map
  overlays, index.html).
"""

import json
import os

import jax
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging

from jaxad import (
  checkpoint,
  cli,
  configlib,
  loop,
  methods,
  metrics,
  report,
  sharding,
)
from jaxad.methods import api


def score_fn(method: api.Method, config: mlc.ConfigDict, mesh):
  """The jitted `method.score(config, model, context, images)`.

  Replicated outputs, so that every host can fetch all scores.
  """
  return jax.jit(
    lambda model, context, images: method.score(config, model, context, images),
    out_shardings=sharding.replicated(mesh),
  )


def check_scores(method: api.Method, config, model, data, mesh) -> None:
  """Traces `method.score` on one eval batch (no compute) and checks its
  output against `method.scores(config)`, before any training.

  Raises:
    ValueError: scores other than `scores()` lists, a map whose name is
      not a score, or a score that is not [B] / a map that is not 3-D.
  """
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
  """Scores `data.test`, writes eval.json, scores.npz, maps.npz (and the
  visual report with `write_report`); returns the eval.json content."""
  check_scores(method, config, model, data, mesh)
  with jax.set_mesh(mesh):
    context = method.score_context(config, model, data)
    out = score_images(
      score_fn(method, config, mesh),
      model,
      context,
      data.test,
      config.eval.batch_size,
      mesh,
    )
  order = [s.name for s in method.scores(config)]
  labels = np.asarray(data.test_labels)
  result = {
    "dataset": data.name,
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
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
    np.savez(
      os.path.join(workdir, "scores.npz"),
      labels=labels,
      names=np.asarray(data.test_names),
      **out["scores"],
    )
    np.savez_compressed(
      os.path.join(workdir, "maps.npz"),
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
  return result


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
  pixel = all("aupro" in m for m in result["scores"].values())
  header = f"{'score':<10} {'AUROC':>7} {'AP':>7}"
  lines = [header + (f" {'pAUROC':>7} {'AUPRO':>7}" if pixel else "")]
  for name, m in result["scores"].items():
    line = f"{name:<10} {m['auroc']:>7.4f} {m['ap']:>7.4f}"
    if pixel:
      line += f" {m['pixel_auroc']:>7.4f} {m['aupro']:>7.4f}"
    lines.append(line)
  lines.append(
    f"({result['num_normal']} normal / {result['num_abnormal']} "
    "abnormal test images)"
  )
  return "\n".join(lines)


def restore(config: mlc.ConfigDict, workdir: str):
  """The method, its trained `Model` from W's latest checkpoint, the mesh.

  Raises:
    FileNotFoundError: W has no checkpoint.
    ValueError: `config` differs from W/config.json in a key that neither
      re-scoring (`Method.rescoring_changes`) nor resuming may change.
  """
  mesh = sharding.make_mesh(config.mesh)
  method = methods.get(config.method)
  method.check_config(config)
  if not method.trains(config):  # zero-shot / imported: nothing to restore
    allowed = method.rescoring_changes() + ("mesh.",)
    configlib.check_workdir(config, workdir, allowed, write=False)
    return method, loop.place(method.init_state(config), mesh).model(), mesh
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"No checkpoint in {directory}: train first with python -m jaxad.train"
    )
  # The trained run's config, up to what re-scoring may change (another
  # support set, the mesh) and what resuming it may.
  stored = configlib.stored_config(workdir)
  allowed = method.resumable_changes(stored) + method.rescoring_changes()
  configlib.check_workdir(config, workdir, allowed + ("mesh.",), write=False)
  ckpt = checkpoint.Checkpointer(directory)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
        f"No checkpoint in {directory}: train first with python -m jaxad.train"
      )
    state = ckpt.restore_latest(loop.place(method.init_state(config), mesh))
  finally:
    ckpt.close()
  return method, state.model(), mesh


_REPORT = flags.DEFINE_bool(
  "report", False, "Also write W/report/ (ROC, histograms, map grid, HTML)."
)


def main(argv):
  del argv
  config, workdir = cli.CONFIG.value, cli.WORKDIR.value
  cli.setup_logging()
  sharding.initialize_distributed()
  method, model, mesh = restore(config, workdir)
  data = method.load_data(config, workdir)
  evaluate(
    config, workdir, method, model, data, mesh, write_report=_REPORT.value
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
