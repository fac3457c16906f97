"""Visual report of an evaluation: ROC curves, histograms, map grids, HTML.

`python -m jaxad.evaluate --config C --workdir W --report` writes W/report/:
* `roc.png`: the ROC curve of every score on one plot;
* `histograms.png`: normal vs abnormal image scores, one panel per score;
* `grid.png` (methods with pixel maps): the two highest- and lowest-scored
  normals and abnormals (ranked by the method's last score, its refined one
  where it has one), each with its pixel maps overlaid on the image; every
  map type has one colour scale, min..max over the whole test set, shown by
  its colour bar;
* `index.html`: the pictures, the metrics table with each score's
  description (from the method), and the config.

Needs matplotlib (`pip install 'jaxad[report]'`).
"""

import html
import json
import os

import numpy as np
from sklearn import metrics as skm


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
  fig, ax = plt.subplots(figsize=(5, 5))
  for name in order:
    fpr, tpr, _ = skm.roc_curve(labels, scores[name])
    auroc = result["scores"][name]["auroc"]
    ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.3f})")
  ax.plot([0, 1], [0, 1], "k:", lw=1)
  ax.set(
    xlabel="false positive rate",
    ylabel="true positive rate",
    title=f"ROC, {result['dataset']}",
    xlim=(0, 1),
    ylim=(0, 1.01),
  )
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _histograms(plt, order, scores, labels, path):
  n = len(order)
  fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
  for ax, name in zip(axes[0], order, strict=True):
    s = scores[name]
    bins = np.linspace(s.min(), s.max(), 40)
    ax.hist(s[labels == 0], bins, alpha=0.6, label="normal", color="tab:blue")
    ax.hist(s[labels == 1], bins, alpha=0.6, label="abnormal", color="tab:red")
    ax.set(title=name, xlabel="image score", ylabel="images")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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


def _show(ax, image):
  """A uint8 [S, S, C] image, grayscale or RGB."""
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
  else:
    ax.imshow(image)


def _grid(plt, order, images, maps, scores, labels, names, path):
  kinds = [k for k in order if k in maps]
  rank_by = kinds[-1]  # the method's last (refined) score with a map
  rows = pick_examples(scores[rank_by], labels)
  # One colour scale per map type over the whole test set: comparable across
  # rows, and nothing is clipped.
  limits = {k: (float(np.min(maps[k])), float(np.max(maps[k]))) for k in kinds}
  fig, axes = plt.subplots(
    len(rows),
    len(kinds) + 1,
    figsize=(1.9 * (len(kinds) + 1), 2.0 * len(rows)),
    squeeze=False,
  )
  for r, (title, i) in enumerate(rows):
    _show(axes[r, 0], images[i])
    axes[r, 0].set_title(f"{title}\n{os.path.basename(names[i])}", fontsize=6)
    for c, k in enumerate(kinds, start=1):
      _show(axes[r, c], images[i])
      lo, hi = limits[k]
      im = axes[r, c].imshow(
        maps[k][i].astype(np.float32), cmap="jet", alpha=0.45, vmin=lo, vmax=hi
      )
      axes[r, c].set_title(f"{k}: {scores[k][i]:.4f}", fontsize=7)
      if r == len(rows) - 1:
        cbar = fig.colorbar(
          im, ax=axes[:, c], orientation="horizontal", fraction=0.02, pad=0.01
        )
        cbar.set_label(f"{k} map [{lo:.3g}, {hi:.3g}]", fontsize=6)
        cbar.ax.tick_params(labelsize=5)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"ranked by {rank_by}; overlays: jet, alpha 0.45", fontsize=8)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _html(result, infos, has_grid, config_json, path):
  rows = "".join(
    f"<tr><td>{html.escape(info.name)}</td>"
    f"<td>{html.escape(info.description)}</td>"
    f"<td>{m['auroc']:.4f}</td><td>{m['ap']:.4f}</td></tr>"
    for info in infos
    for m in [result["scores"][info.name]]
  )
  grid = (
    '<h2>Pixel maps</h2><img src="grid.png" alt="map grid">'
    if has_grid
    else "<p>This method gives no pixel maps.</p>"
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
<table><tr><th>score</th><th>what it is</th><th>AUROC</th><th>AP</th></tr>
{rows}</table>
<h2>ROC curves</h2><img src="roc.png" alt="ROC curves">
<h2>Image scores, normal vs abnormal</h2>
<img src="histograms.png" alt="score histograms">
{grid}
<h2>Config</h2><pre>{html.escape(config_json, quote=False)}</pre>
</body></html>
"""
  with open(path, "w") as f:
    f.write(page)


def write(workdir, result, data, scores, maps, infos, config):
  """Writes WORKDIR/report/ (see the module docstring); returns its path.

  Args:
    result: eval.json's content.
    data: the evaluated data (`api.EvalData`): test images [N, S, S, C]
      uint8, labels [N] 0/1, names.
    scores: {name: [N]} image scores; maps: {name: [N, S, S]}, may be {}.
    infos: the method's `api.Score`s, in display order.
    config: the run's ConfigDict.
  """
  plt = _pyplot()
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  labels = np.asarray(data.test_labels)
  order = [info.name for info in infos]
  _roc(plt, order, scores, labels, result, os.path.join(out, "roc.png"))
  _histograms(plt, order, scores, labels, os.path.join(out, "histograms.png"))
  if maps:
    _grid(
      plt,
      order,
      data.test,
      maps,
      scores,
      labels,
      data.test_names,
      os.path.join(out, "grid.png"),
    )
  config_json = json.dumps(json.loads(config.to_json()), indent=2)
  _html(result, infos, bool(maps), config_json, os.path.join(out, "index.html"))
  return out
