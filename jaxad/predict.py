r"""Scores new images with a trained run: a file, a folder or a .npz.

  python -m jaxad.predict --workdir W --input PATH [--output OUT] \
      [--overlays] [--batch_size N]

PATH is an image file, a folder (walked recursively for .png .jpg .jpeg .bmp
.tif .tiff in any case; names starting with "." are ignored, files and
folders alike) or a .npz with "images" uint8 [N, H, W(, 1|3)] (or a single
array) and optionally "names" [N] str. Every image is decoded exactly as
the training data was (`jaxad.data.manifest.decode`: grayscale or RGB as
the run, bilinear resize to its size) and scored in batches of N (default
the run's eval.batch_size), decoding one batch ahead of scoring, so memory
stays flat whatever the number of files. OUT (default
W/predictions/<input name>-<time>) receives:

* `predictions.csv`: `file`; per score s: `s` (the score), `s_abnormal` (1
  when s > the run's calibrated threshold, W/eval.json; empty without
  one), `s_percentile` (percent of the run's calibration normals scoring
  <= s, W/calibration_scores.npz; empty without them); `error` (why a file
  could not be read: its score columns are then empty). A bad file never
  stops the others, and is never left out.
* `maps.npz`: per file, float16 [K, S, S], the K maps listed by
  "__map_names__" (methods without maps: no file);
* `summary.json`: counts (images, scored, unreadable, abnormal per score),
  the unreadable files, thresholds, images/s;
* with --overlays, `overlays/<file>.png`: the image and each map overlaid,
  on one colour scale per map for the whole run, the same as the report's
  (`jaxad.map_colours`: p0.5..p99.5 of the run's test maps, W/maps.npz,
  first 512 images; each image's min..max without it), stated under each
  panel.

Progress and images/s are logged every 10 s.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import sys
import time
import zipfile

import numpy as np
from absl import app, flags, logging

from jaxad import cli, inference, map_colours, storage
from jaxad.data import inputs, manifest

MAP_NAMES_KEY = "__map_names__"
OVERLAY_PERCENTILES = map_colours.MAP_PERCENTILES  # the report's
# Test maps read from W/maps.npz for the overlays' colour scales.
_SCALE_SAMPLE = 512


class NpzWriter:
  """Writes an .npz one array at a time (what np.savez writes at once), so
  that the maps of a large input never sit in memory together."""

  def __init__(self, path: str):
    self.path = path
    self._partial = storage.path(path + ".partial")
    self._file = self._partial.open("wb")
    self._zip = zipfile.ZipFile(
      self._file, "w", zipfile.ZIP_DEFLATED, allowZip64=True
    )

  def add(self, key: str, array: np.ndarray) -> None:
    with self._zip.open(key + ".npy", "w", force_zip64=True) as f:
      np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

  def close(self, *, complete: bool = True) -> None:
    """Completes the file (until then it is `path`.partial); with
    `complete=False` (an interrupted run) leaves it as `path`.partial."""
    self._zip.close()
    self._file.close()
    if complete:
      self._partial.replace(storage.path(self.path))


def _cell(value, digits: str = ".9g") -> str:
  if value is None:
    return ""
  if isinstance(value, bool):
    return "1" if value else "0"
  if isinstance(value, float):
    return format(value, digits)
  return str(value)


def format_row(row: dict) -> dict:
  """A `TrainedModel.predict` row as CSV cells ("" for None, 1/0)."""
  return {
    k: _cell(v, ".4f" if k.endswith("_percentile") else ".9g")
    for k, v in row.items()
    if k != "maps"
  }


def read_test_maps(workdir: str, name: str, limit: int = _SCALE_SAMPLE):
  """The first `limit` maps of score `name` in W/maps.npz, float32
  [n, S, S], read without loading the rest; None if absent."""
  path = storage.path(os.path.join(workdir, "maps.npz"))
  try:
    with (
      path.open("rb") as npz,
      zipfile.ZipFile(npz) as z,
      z.open(name + ".npy") as f,
    ):
      read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
      }.get(np.lib.format.read_magic(f))
      if read is None:
        return None
      shape, fortran, dtype = read(f)
      if fortran or len(shape) != 3:
        return None
      n = min(limit, shape[0])
      count = n * shape[1] * shape[2]
      data = f.read(count * dtype.itemsize)
      return np.frombuffer(data, dtype, count).reshape(n, *shape[1:])
  except (OSError, KeyError, ValueError, zipfile.BadZipFile):
    return None


def colour_scales(trained: inference.TrainedModel) -> dict:
  """{map name: map_colours.Scale or None}: the overlays' fixed colour
  scales, the OVERLAY_PERCENTILES of the run's test maps (as the report's);
  None: per image min..max."""
  scales = {}
  for name in trained.map_names:
    maps = read_test_maps(trained.workdir, name)
    scales[name] = None
    if maps is not None and maps.size:
      with contextlib.suppress(ValueError):  # no finite value: per image
        scales[name] = map_colours.colour_scale(
          maps, OVERLAY_PERCENTILES, "the run's test maps"
        )
  return scales


def _figure_class():
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError(
      "--overlays needs matplotlib: pip install 'jaxad[report]'"
    ) from e
  return Figure, FigureCanvasAgg


def write_overlay(
  path: str,
  image: np.ndarray,
  maps: dict[str, np.ndarray],
  row: dict,
  trained: inference.TrainedModel,
  scales: dict,
) -> None:
  """One PNG: the image, then each map over it with its colour bar; the
  panel titles give the score, the decision and the percentile, and the
  colour scale is written under each panel."""
  figure, canvas = _figure_class()
  names = [n for n in trained.map_names if n in maps]
  fig = figure(figsize=(3.0 * (1 + len(names)), 3.5), dpi=100)
  canvas(fig)
  axes = fig.subplots(1, 1 + len(names), squeeze=False)[0]
  gray = image[..., 0] if image.shape[-1] == 1 else image
  axes[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
  file = str(row["file"])
  axes[0].set_title(file if len(file) <= 32 else "..." + file[-29:], fontsize=9)
  for ax, name in zip(axes[1:], names, strict=True):
    m = maps[name]
    scale = scales.get(name) or map_colours.Scale(
      float(m.min()), float(m.max()), "this image's min..max", "neither"
    )
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    im = ax.imshow(m, vmin=scale.lo, vmax=scale.hi, **map_colours.OVERLAY)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend=scale.extend)
    bar.ax.tick_params(labelsize=8)
    title = f"{name} = {row[name]:.4g}"
    if row.get(f"{name}_abnormal") is not None:
      title += " ABNORMAL" if row[f"{name}_abnormal"] else " normal"
    if row.get(f"{name}_percentile") is not None:
      title += f"\n{row[f'{name}_percentile']:.1f}th pct of normals"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(map_colours.scale_label(name, scale), fontsize=8)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  storage.write_figure(fig, path)


def _overlay_path(folder: str, name: str) -> str:
  """folder/<name>.png, kept inside `folder` whatever the name holds."""
  parts = [p for p in str(name).replace("\\", "/").split("/") if p]
  parts = [p if p not in (".", "..") else "_" for p in parts] or ["_"]
  return os.path.join(folder, *parts) + ".png"


def default_output(workdir: str, input_path: str) -> str:
  """W/predictions/<input's name>-<YYYYmmdd-HHMMSS>."""
  stem = os.path.basename(os.path.normpath(input_path)) or "input"
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join(workdir, "predictions", f"{stem}-{stamp}")


def predict(
  trained: inference.TrainedModel,
  input_path: str,
  output: str,
  *,
  overlays: bool = False,
  progress_every: float = 10.0,
) -> dict:
  """Scores every image under `input_path` and writes `output`/.

  Args:
    trained: `jaxad.load(W)`.
    input_path: an image file, a folder or an .npz
      (`jaxad.data.inputs.find_inputs`).
    output: the folder for predictions.csv, maps.npz, summary.json and
      overlays/.
    overlays: also write overlays/<file>.png (needs matplotlib).
    progress_every: seconds between progress lines.

  Returns:
    The summary (also written to `output`/summary.json).

  Raises:
    FileNotFoundError: `input_path` does not exist.
    ValueError: no image under it, or an unusable .npz.
  """
  if overlays:
    _figure_class()  # fail before any work without matplotlib
  entries = inputs.find_inputs(input_path)
  other = inputs.count_other_files(input_path)
  if not entries:
    raise ValueError(
      f"No image in {input_path} (extensions"
      f" {'/'.join(e[1:] for e in manifest.IMAGE_EXTENSIONS)}, any case;"
      f" {other} other files)"
    )
  if other:
    logging.warning(
      "%s: %d files without an image extension are not scored",
      input_path,
      other,
    )
  storage.path(output).mkdir(parents=True, exist_ok=True)
  missing = [n for n, t in trained.threshold.items() if t is None]
  if missing:
    logging.warning(
      "No calibrated threshold for %s in %s/eval.json: their _abnormal"
      " columns are empty",
      ",".join(missing),
      trained.workdir,
    )
  scales = colour_scales(trained) if overlays else {}
  total, errors, scored = len(entries), [], 0
  abnormal = {n: 0 for n in trained.score_names}
  maps_writer = None
  if trained.map_names:
    maps_writer = NpzWriter(os.path.join(output, "maps.npz"))
    maps_writer.add(MAP_NAMES_KEY, np.asarray(trained.map_names))
  start = last_log = time.perf_counter()
  first_batch_end, first_batch_n = None, 0
  csv_path = os.path.join(output, "predictions.csv")
  complete = False
  with contextlib.ExitStack() as cleanup:
    if maps_writer is not None:
      cleanup.callback(lambda: maps_writer.close(complete=complete))
    f = cleanup.enter_context(storage.path(csv_path).open("w"))
    writer = csv.DictWriter(f, fieldnames=trained.columns())
    writer.writeheader()
    done = 0
    for batch in trained.iter_predict(entries):
      for row in batch.rows:
        writer.writerow(format_row(row))
        if row["error"]:
          errors.append((row["file"], row["error"]))
        for n in trained.score_names:
          abnormal[n] += bool(row[f"{n}_abnormal"])
      for j, i in enumerate(batch.ok):
        row = batch.rows[i]
        maps = {k: v[j] for k, v in batch.maps.items()}
        if maps_writer is not None:
          stack = np.stack([maps[k] for k in trained.map_names])
          maps_writer.add(row["file"], stack.astype(np.float16))
        if overlays:
          path = _overlay_path(os.path.join(output, "overlays"), row["file"])
          write_overlay(path, batch.images[j], maps, row, trained, scales)
      f.flush()
      scored += len(batch.ok)
      done += len(batch.rows)
      now = time.perf_counter()
      if first_batch_end is None:
        first_batch_end, first_batch_n = now, done
      if now - last_log >= progress_every and done < total:
        last_log = now
        rate = done / (now - start)
        logging.info(
          "%d/%d images (%d unreadable), %.1f images/s, ETA %.0f s",
          done,
          total,
          len(errors),
          rate,
          (total - done) / rate,
        )
    complete = True
  seconds = time.perf_counter() - start
  steady = None
  if first_batch_end is not None and total > first_batch_n:
    steady = (total - first_batch_n) / max(
      seconds - (first_batch_end - start), 1e-9
    )
  summary = {
    "input": os.path.abspath(input_path),
    "output": storage.absolute(output),
    "workdir": storage.absolute(trained.workdir),
    "images": total,
    "scored": scored,
    "unreadable": len(errors),
    "unreadable_files": [{"file": n, "error": e} for n, e in errors],
    "other_files_not_scored": other,
    "thresholds": trained.threshold,
    "abnormal": {
      n: (abnormal[n] if trained.threshold[n] is not None else None)
      for n in trained.score_names
    },
    "batch_size": trained.batch_size,
    "seconds": seconds,
    "images_per_s": total / seconds,
    # Without the first batch (it includes compiling the scoring function).
    "images_per_s_after_first_batch": steady,
  }
  storage.write_json(os.path.join(output, "summary.json"), summary, indent=2)
  logging.info("%s", format_summary(summary))
  return summary


def format_summary(summary: dict, max_errors: int = 10) -> str:
  """The summary as console lines."""
  lines = [
    f"Scored {summary['scored']}/{summary['images']} images in"
    f" {summary['seconds']:.1f} s ({summary['images_per_s']:.1f} images/s"
    + (
      f", {summary['images_per_s_after_first_batch']:.1f} after the first batch"
      if summary["images_per_s_after_first_batch"]
      else ""
    )
    + f"); {summary['unreadable']} unreadable."
  ]
  for name, n in summary["abnormal"].items():
    t = summary["thresholds"][name]
    if t is not None:
      lines.append(f"  {name}: {n} abnormal (score > {t:.6g})")
  bad = summary["unreadable_files"]
  for item in bad[:max_errors]:
    lines.append(f"  unreadable: {item['file']}: {item['error']}")
  if len(bad) > max_errors:
    lines.append(f"  ... and {len(bad) - max_errors} more (predictions.csv)")
  lines.append(f"Wrote {summary['output']}/predictions.csv")
  return "\n".join(lines)


_INPUT = flags.DEFINE_string(
  "input", None, "An image file, a folder (recursive) or a .npz."
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Output folder; default W/predictions/<input>-<time>."
)
_OVERLAYS = flags.DEFINE_bool(
  "overlays", False, "Also write one PNG per image with its maps overlaid."
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", None, "Images per jitted call; default eval.batch_size."
)


# A mistake in the inputs or flags (a folder without images, an unusable
# .npz, --batch_size 0): one line, exit 2.
@cli.user_errors(manifest.DataError, FileNotFoundError, ValueError)
def main(argv):
  del argv
  cli.setup_logging()
  if cli.CONFIG.value is not None:
    raise app.UsageError(
      "predict reads the run's config from the workdir (W/eval_config.json,"
      " else W/config.json): drop --config"
    )
  workdir = cli.WORKDIR.value
  output = _OUTPUT.value or default_output(workdir, _INPUT.value)
  storage.path(output)  # an unreachable URI fails here, before any work
  trained = inference.load(workdir, batch_size=_BATCH_SIZE.value)
  logging.info("%r", trained)
  summary = predict(trained, _INPUT.value, output, overlays=_OVERLAYS.value)
  if not summary["scored"]:  # every input unreadable: nothing to act on
    print(
      f"error: none of the {summary['images']} images could be read (the"
      f" reasons are in {summary['output']}/predictions.csv)",
      file=sys.stderr,
      flush=True,
    )
    sys.exit(1)


if __name__ == "__main__":
  flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir
  flags.mark_flags_as_required(["workdir", "input"])
  app.run(main, flags_parser=cli.parse_flags)
