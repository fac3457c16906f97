"""Visual report of an evaluation: ROC curves, histograms, map grids, HTML.

`python -m jaxad.evaluate --config C --workdir W --report` writes W/report/:
* `roc.png`: the ROC curve of every score on one plot;
* `histograms.png`: normal vs abnormal image scores, one panel per score,
  with the calibrated decision threshold (eval.json
  `scores.<name>.calibrated.threshold`, chosen on the calibration normals
  alone) as a dashed vertical line where eval.json has one;
* `grid.png` (methods with pixel maps): the two highest- and lowest-scored
  normals and abnormals (ranked by the method's last score, its refined one
  where it has one), each with its pixel maps overlaid on the image. Every
  map type has one colour scale for all rows, clipped to the 0.5th..99.5th
  percentiles of its pixels over the whole test set
  (`jaxad.map_colours.MAP_PERCENTILES`), so that a few extreme pixels do
  not squash the rest into one colour; pixels beyond take the end colours.
  The colour bars state the range and how it was chosen. Rows showing
  pixel-identical images (same uint8 pixels, e.g. a duplicated file) say
  so in their titles;
* `index.html`: the pictures, the metrics table (with the calibrated
  threshold, when there is one) with each score's description (from the
  method), how the colour scales were chosen, and the config.

Needs matplotlib (`pip install 'jaxad[report]'`).
"""

import hashlib
import html
import json
import os

import numpy as np
from sklearn import metrics as skm

from jaxad import storage
from jaxad.map_colours import (
  MAP_PERCENTILES,
  OVERLAY,
  colour_scale,
  scale_label,
)

FONT = 9  # points at the saved size; nothing in the figures is below 8
_CLASSES = ((0, "normal", "tab:blue"), (1, "abnormal", "tab:red"))


def _pyplot():
  try:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot
  except ImportError as e:
    raise ImportError(
      "The report needs matplotlib: pip install 'jaxad[report]'"
    ) from e
  return pyplot


def _roc(plt, order, scores, labels, result, path):
  fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
  for name in order:
    fpr, tpr, _ = skm.roc_curve(labels, scores[name])
    auroc = result["scores"][name]["auroc"]
    ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.3f})")
  ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
  ax.set(xlim=(0, 1), ylim=(0, 1.01))
  ax.set_xlabel("false positive rate (1 - specificity)", fontsize=FONT)
  ax.set_ylabel("true positive rate (sensitivity)", fontsize=FONT)
  ax.set_title(f"ROC, {result['dataset']}", fontsize=FONT + 1)
  ax.tick_params(labelsize=FONT)
  ax.legend(loc="lower right", fontsize=FONT)
  storage.write_figure(fig, path, dpi=120)
  plt.close(fig)


def threshold_of(result: dict, name: str) -> float | None:
  """eval.json's calibrated threshold of score `name`, or None."""
  cal = result.get("scores", {}).get(name, {}).get("calibrated")
  return None if cal is None else float(cal["threshold"])


def histogram_figure(plt, order, scores, labels, result):
  """The figure of histograms.png, not saved (tests inspect its Axes).

  Args:
    plt: matplotlib.pyplot.
    order: score names, one panel each; scores: {name: [N] float}.
    labels: [N] 0 normal / 1 abnormal; result: eval.json's content.

  Returns:
    The Figure: per score, the two histograms on the same 40 bins, and
    the calibrated threshold (`threshold_of`) as a dashed vertical line
    labelled "threshold <value>" where there is one.
  """
  n = len(order)
  fig, axes = plt.subplots(
    1, n, figsize=(3.6 * n, 3.9), squeeze=False, layout="constrained"
  )
  cal = None
  for ax, name in zip(axes[0], order, strict=True):
    s = np.asarray(scores[name], np.float64)
    bins = np.linspace(s.min(), s.max(), 41)
    for label, kind, colour in _CLASSES:
      part = s[labels == label]
      legend = f"{kind} ({part.size})"
      ax.hist(part, bins, alpha=0.6, color=colour, label=legend)
    t = threshold_of(result, name)
    if t is not None:
      cal = result["scores"][name]["calibrated"]
      ax.axvline(t, color="k", ls="--", lw=1.5, label=f"threshold {t:.4g}")
    ax.set_title(name, fontsize=FONT + 1)
    ax.set_xlabel("anomaly score", fontsize=FONT)
    ax.set_ylabel("images", fontsize=FONT)
    ax.locator_params(axis="x", nbins=4)  # long tick labels must not touch
    ax.tick_params(labelsize=FONT)
    # Below the panel: inside, it would hide bars.
    ax.legend(
      fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2
    )
  if cal is not None:
    fig.suptitle(
      "dashed: decision threshold at specificity"
      f" {cal['target_specificity']:g} on {cal['num_calibration']}"
      " calibration normals (never the test set)",
      fontsize=FONT,
    )
  return fig


def pick_examples(score, labels, k=2):
  """Indices of the k highest and k lowest scored normals and abnormals.

  Returns:
    [(title, index)] in the order: normals high, normals low, abnormals
    high, abnormals low.
  """
  out = []
  for label, kind in ((0, "normal"), (1, "abnormal")):
    idx = np.flatnonzero(labels == label)
    order = idx[np.argsort(score[idx], kind="stable")]
    out += [(f"{kind}, highest", i) for i in order[::-1][:k]]
    out += [(f"{kind}, lowest", i) for i in order[:k]]
  return out


def duplicate_notes(images, indices) -> list[str]:
  """Per shown row, which other shown rows have the same pixels.

  Args:
    images: [N, S, S, C] uint8 test images.
    indices: the shown rows' indices into `images` (rows numbered from 1).

  Returns:
    One string per row: "" when unique among the rows, else e.g.
    "(identical to #3)" (same uint8 pixels: SHA-1 of shape and bytes) or
    "(same image as #3)" (the same test image shown twice).
  """
  keys = []
  for i in indices:
    a = np.ascontiguousarray(images[i])
    keys.append(hashlib.sha1(repr(a.shape).encode() + a.tobytes()).digest())
  notes = []
  for r, i in enumerate(indices):
    same = [f"#{q + 1}" for q, j in enumerate(indices) if q != r and j == i]
    twin = [
      f"#{q + 1}"
      for q, (j, key) in enumerate(zip(indices, keys, strict=True))
      if q != r and j != i and key == keys[r]
    ]
    parts = ([f"same image as {', '.join(same)}"] if same else []) + (
      [f"identical to {', '.join(twin)}"] if twin else []
    )
    notes.append(f"({'; '.join(parts)})" if parts else "")
  return notes


def _show(ax, image):
  """A uint8 [S, S, C] image, grayscale or RGB."""
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
  else:
    ax.imshow(image)


def grid_figure(plt, order, images, maps, scores, labels, names):
  """The figure of grid.png, not saved (tests inspect its Axes).

  Args:
    plt: matplotlib.pyplot; order: score names in display order.
    images: [N, S, S, C] uint8; maps: {name: [N, S, S] float} (not empty);
    scores: {name: [N]}; labels: [N] 0/1; names: N file names.

  Returns:
    (figure, {map name: Scale}, [row note]): the overlays are drawn with
    `colour_scale(maps[name])` (the AxesImage's clim), the rows' notes are
    `duplicate_notes`.
  """
  kinds = [k for k in order if k in maps]
  rank_by = kinds[-1]  # the method's last (refined) score with a map
  rows = pick_examples(scores[rank_by], labels)
  # One scale per map type over the whole test set: comparable across rows.
  scales = {k: colour_scale(maps[k]) for k in kinds}
  notes = duplicate_notes(images, [i for _, i in rows])
  # The colour bars get their own row below the images, so that the layout
  # engine sizes their labels like any axes' decorations.
  fig, axes = plt.subplots(
    len(rows) + 1,
    len(kinds) + 1,
    figsize=(2.3 * (len(kinds) + 1), 2.55 * len(rows) + 1.4),
    height_ratios=[1] * len(rows) + [0.08],
    squeeze=False,
    layout="constrained",
  )
  for r, (title, i) in enumerate(rows):
    _show(axes[r, 0], images[i])
    name = os.path.basename(names[i])
    name = name if len(name) <= 30 else "..." + name[-27:]
    text = f"#{r + 1} {title}\n{name}" + (f"\n{notes[r]}" if notes[r] else "")
    axes[r, 0].set_title(
      text, fontsize=8, color="tab:red" if notes[r] else "black"
    )
    for c, k in enumerate(kinds, start=1):
      _show(axes[r, c], images[i])
      s = scales[k]
      axes[r, c].imshow(
        maps[k][i].astype(np.float32), vmin=s.lo, vmax=s.hi, **OVERLAY
      )
      axes[r, c].set_title(f"{k} = {scores[k][i]:.4g}", fontsize=FONT)
  for ax in axes[:-1].ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  axes[-1, 0].set_axis_off()
  for c, k in enumerate(kinds, start=1):
    cbar = fig.colorbar(
      axes[0, c].images[-1],
      cax=axes[-1, c],
      orientation="horizontal",
      extend=scales[k].extend,
    )
    cbar.set_label(scale_label(k, scales[k]), fontsize=8)
    cbar.ax.tick_params(labelsize=8)
    cbar.ax.locator_params(nbins=4)
  p0, p1 = MAP_PERCENTILES
  fig.suptitle(
    f"ranked by {rank_by}; overlays jet, alpha {OVERLAY['alpha']};"
    f" each map's colour scale: p{p0:g}..p{p1:g}\nof its pixels over all"
    f" {len(labels)} test images (beyond: end colours)",
    fontsize=FONT,
  )
  return fig, scales, notes


def _calibrated_cells(m):
  c = m.get("calibrated")
  if c is None:
    return "<td>-</td><td>-</td><td>-</td>"
  return (
    f"<td>{c['threshold']:.4g}</td><td>{c['sensitivity']:.3f}</td>"
    f"<td>{c['specificity']:.3f}</td>"
  )


def _html(result, infos, grid, config_json, path):
  """index.html; `grid`: None, or (scales, notes) of `grid_figure`."""
  rows = "".join(
    f"<tr><td>{html.escape(info.name)}</td>"
    f"<td>{html.escape(info.description)}</td>"
    f"<td>{m['auroc']:.4f}</td><td>{m['ap']:.4f}</td>"
    f"{_calibrated_cells(m)}</tr>"
    for info in infos
    for m in [result["scores"][info.name]]
  )
  cal = next(
    (
      result["scores"][i.name]["calibrated"]
      for i in infos
      if "calibrated" in result["scores"][i.name]
    ),
    None,
  )
  if cal is None:
    threshold_text = (
      "No calibrated threshold: the run has no calibration normals"
      " (eval.calibration_fraction=0)."
    )
  else:
    threshold_text = (
      "Threshold: chosen on the"
      f" {cal['num_calibration']} calibration normals alone (held out"
      " from training, never the test set) at target specificity"
      f" {cal['target_specificity']:g}; sensitivity and specificity are"
      " the test set's at that threshold (abnormal = score &gt; threshold)."
      " It is the dashed line on the histograms."
    )
  if grid is None:
    grid_html = "<p>This method gives no pixel maps.</p>"
  else:
    scales, notes = grid
    p0, p1 = MAP_PERCENTILES
    items = "".join(
      f"<li>{html.escape(k)}: {s.lo:.4g} .. {s.hi:.4g}"
      f" ({html.escape(s.basis)})</li>"
      for k, s in scales.items()
    )
    dup = sum(1 for n in notes if n)
    grid_html = (
      f"<h2>Pixel maps</h2><p>Each map type has one colour scale for all"
      f" rows: the {p0:g}th to {p1:g}th percentile of its pixels over all"
      " test images, so that a few extreme pixels do not turn the rest"
      " into one colour; pixels beyond take the end colours (the colour"
      f" bar's arrows).</p><ul>{items}</ul>"
      + (
        f"<p>{dup} of the {len(notes)} rows show an image whose pixels"
        " another row shows too (marked in red in its title).</p>"
        if dup
        else ""
      )
      + '<img src="grid.png" alt="map grid">'
    )
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jaxad report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:4px 10px}}
img{{max-width:100%}}pre{{background:#f4f4f4;padding:1em;font-size:12px}}
</style></head><body>
<h1>jaxad report: {html.escape(result["dataset"])}</h1>
<p>{result["num_normal"]} normal / {result["num_abnormal"]} abnormal test
images.</p>
<table><tr><th>score</th><th>what it is</th><th>AUROC</th><th>AP</th>
<th>threshold</th><th>sensitivity</th><th>specificity</th></tr>
{rows}</table>
<p>{threshold_text}</p>
<h2>ROC curves</h2><img src="roc.png" alt="ROC curves">
<h2>Image scores, normal vs abnormal</h2>
<img src="histograms.png" alt="score histograms">
{grid_html}
<h2>Config</h2><pre>{html.escape(config_json, quote=False)}</pre>
</body></html>
"""
  storage.write_text(path, page)


def write(workdir, result, data, scores, maps, infos, config):
  """Writes WORKDIR/report/ (see the module docstring); returns its path.

  Args:
    result: eval.json's content (its `scores.<name>.calibrated.threshold`,
      where present, is drawn on the histograms).
    data: the evaluated data (`api.EvalData`): test images [N, S, S, C]
      uint8, labels [N] 0/1, names.
    scores: {name: [N]} image scores; maps: {name: [N, S, S]}, may be {}.
    infos: the method's `api.Score`s, in display order.
    config: the run's ConfigDict.

  Raises:
    ImportError: without matplotlib.
  """
  plt = _pyplot()
  out = os.path.join(workdir, "report")
  labels = np.asarray(data.test_labels)
  order = [info.name for info in infos]
  _roc(plt, order, scores, labels, result, os.path.join(out, "roc.png"))
  fig = histogram_figure(plt, order, scores, labels, result)
  storage.write_figure(fig, os.path.join(out, "histograms.png"), dpi=110)
  plt.close(fig)
  grid = None
  grid_path = os.path.join(out, "grid.png")
  if maps:
    fig, scales, notes = grid_figure(
      plt, order, data.test, maps, scores, labels, data.test_names
    )
    storage.write_figure(fig, grid_path, dpi=110)
    plt.close(fig)
    grid = (scales, notes)
  else:  # an earlier run's maps, if any: not these
    storage.path(grid_path).unlink(missing_ok=True)
  config_json = json.dumps(json.loads(config.to_json()), indent=2)
  _html(result, infos, grid, config_json, os.path.join(out, "index.html"))
  return out
