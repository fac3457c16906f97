"""Host-side evaluation metrics (numpy / scipy / scikit-learn).

Image level: `image_metrics` (AUROC, AP), `decision_metrics` (F1,
accuracy, sensitivity, specificity at a fixed threshold),
`threshold_at_specificity` (a threshold from normal scores alone) and
`calibrated_metrics` (the test set at that threshold). Pixel level:
`pixel_auroc` over all pixels of all test images, and `aupro`, the
normalised area under the per-region-overlap curve of MVTec AD (Bergmann
et al., IJCV 2021); `pixel_metrics` gives both from one sort.
"""

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

# Ground-truth regions are 8-connected, as in the MVTec AD evaluation code
# (`ndimage.label(..., structure=np.ones((3, 3)))`). The leading 0-planes
# keep regions of different images apart when a stack is labelled at once.
_REGIONS_8 = np.pad(np.ones((1, 3, 3), np.int32), ((1, 1), (0, 0), (0, 0)))


def _matching(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """(float64 scores, labels) as arrays; ValueError unless both are [N]."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(
      f"scores {scores.shape} and labels {labels.shape} must "
      "be matching 1-d arrays"
    )
  return scores, labels


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """AUROC and average precision of image scores (higher = more anomalous).

  Args:
    scores: [N] float scores.
    labels: [N] 0 normal, 1 abnormal; both classes must be present.

  Returns:
    {"auroc": float, "ap": float}.
  """
  scores, labels = _matching(scores, labels)
  if not np.all(np.isfinite(scores)):
    raise ValueError(
      f"{int(np.sum(~np.isfinite(scores)))} scores are not finite"
    )
  if len(np.unique(labels)) != 2:
    raise ValueError(
      "AUROC needs both normal (0) and abnormal (1) samples, "
      f"got labels {np.unique(labels).tolist()}"
    )
  return {
    "auroc": float(skm.roc_auc_score(labels, scores)),
    "ap": float(skm.average_precision_score(labels, scores)),
  }


def decision_metrics(
  scores: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, float]:
  """The yes/no decision `score > threshold` against the labels.

  Args:
    scores: [N] float scores (higher = more anomalous).
    labels: [N] 0 normal, 1 abnormal.
    threshold: a score is abnormal when strictly above it (PPAD reports
      F1 and accuracy at 0.5 on its softmax probabilities, METHODS.md 3.7).

  Returns:
    {"decision_threshold", "f1" (abnormal = positive), "accuracy",
    "sensitivity" (abnormal recall), "specificity" (normal recall)}; a
    class absent from
    `labels` gives NaN for its recall.
  """
  scores, labels = _matching(scores, labels)
  decided = (scores > threshold).astype(labels.dtype)

  def recall(c: int) -> float:
    return (
      float(np.mean(decided[labels == c] == c))
      if np.any(labels == c)
      else float("nan")
    )

  return {
    "decision_threshold": float(threshold),
    "f1": float(skm.f1_score(labels, decided, zero_division=0.0)),
    "accuracy": float(skm.accuracy_score(labels, decided)),
    "sensitivity": recall(1),
    "specificity": recall(0),
  }


def threshold_at_specificity(normal_scores: np.ndarray, target: float) -> float:
  """The decision threshold at a target specificity, from normals only.

  The rule: the smallest observed score t such that at least `target` of
  `normal_scores` are <= t, i.e. the k-th smallest score with
  k = ceil(target * N). With the decision `score > t` (as
  `decision_metrics`), a new normal image whose score is distributed like
  these is called normal with probability >= `target` (empirically). Only
  held-out normal images (the calibration split) may be passed: a test set
  must never choose its own threshold.

  Args:
    normal_scores: [N] finite scores of normal images, N >= 1.
    target: the specificity, in (0, 1].

  Returns:
    t, one of `normal_scores`; target=1 gives their maximum.
  """
  scores = np.sort(np.asarray(normal_scores, np.float64))
  if scores.ndim != 1 or not len(scores):
    raise ValueError(
      f"normal_scores must be a non-empty 1-d array, got shape {scores.shape}"
    )
  if not np.all(np.isfinite(scores)):
    raise ValueError(
      f"{int(np.sum(~np.isfinite(scores)))} normal scores are not finite"
    )
  if not 0.0 < target <= 1.0:
    raise ValueError(f"target specificity must be in (0, 1], got {target}")
  # (i + 1) / N is correctly rounded, so k / N == target is found exactly
  # (a float ceil(target * N) can overshoot: 0.7 * 10 = 7.000000000000001).
  covered = np.arange(1, len(scores) + 1) / len(scores)
  return float(scores[int(np.argmax(covered >= target))])


def calibrated_metrics(
  normal_scores: np.ndarray,
  scores: np.ndarray,
  labels: np.ndarray,
  target: float,
) -> dict[str, float]:
  """The threshold of `threshold_at_specificity` and the test set there.

  Args:
    normal_scores: [NC] scores of the calibration normals (held out from
      training and from the test set); they alone choose the threshold.
    scores: [N] test scores; labels: [N] 0 normal, 1 abnormal.
    target: the target specificity, in (0, 1].

  Returns:
    {"threshold", "target_specificity", "num_calibration",
    "calibration_specificity" (fraction of the calibration normals at or
    below the threshold), "sensitivity", "specificity" (test set, decision
    `score > threshold`; NaN for a class absent from `labels`)}.
  """
  normal_scores = np.asarray(normal_scores, np.float64)
  t = threshold_at_specificity(normal_scores, target)
  test = decision_metrics(scores, labels, t)
  return {
    "threshold": t,
    "target_specificity": float(target),
    "num_calibration": len(normal_scores),
    "calibration_specificity": float(np.mean(normal_scores <= t)),
    "sensitivity": test["sensitivity"],
    "specificity": test["specificity"],
  }


def _check_pixels(maps: np.ndarray, masks: np.ndarray):
  """Validated (maps float32, masks bool), both [N, H, W]."""
  maps, masks = np.asarray(maps), np.asarray(masks)
  if maps.shape != masks.shape or maps.ndim != 3:
    raise ValueError(
      f"maps {list(maps.shape)} and masks {list(masks.shape)} must be"
      " matching [N, H, W] arrays (resize the maps to the masks first)"
    )
  bad = ~np.isfinite(maps)
  if bad.any():
    raise ValueError(f"{int(bad.sum())} map values are not finite")
  if not np.isin(masks, (0, 1)).all():
    raise ValueError(
      "masks must hold only 0 (normal) and 1 (anomalous) pixels, found"
      f" {np.unique(masks)[:8].tolist()}"
    )
  masks = masks.astype(bool)
  if not masks.any():
    raise ValueError("masks have no anomalous pixels (all 0)")
  if masks.all():
    raise ValueError("masks have no normal pixels (all 1)")
  # float32 halves the memory of the sort; map values are float16/32 anyway.
  return maps.astype(np.float32), masks


def _curves(maps: np.ndarray, masks: np.ndarray):
  """ROC and per-region-overlap curves at every distinct threshold.

  A pixel is predicted anomalous at threshold t when its score is >= t.
  FPR(t) is the fraction of all normal pixels (mask 0, over all images)
  predicted anomalous and TPR(t) that of all anomalous pixels. PRO(t) is the
  mean over all ground-truth regions (8-connected components of every
  image's mask) of the fraction of the region predicted anomalous. All three
  are sums of per-pixel weights (1 / #normal, 1 / #anomalous,
  1 / (R * |region|)) over the pixels scored >= t, so one sort and
  cumulative sums give every curve.

  Args:
    maps: [N, H, W] float anomaly maps.
    masks: [N, H, W] ground truth in {0, 1}, with both values present.

  Returns:
    (fpr, tpr, pro), each [T + 1] float64 for T distinct scores, from
    (0, 0, 0) to (1, 1, 1), non-decreasing.
  """
  maps, masks = _check_pixels(maps, masks)
  regions, num_regions = ndimage.label(masks, structure=_REGIONS_8)
  regions = regions.ravel()
  sizes = np.bincount(regions)
  weight_pro = np.zeros(len(sizes))
  weight_pro[1:] = 1.0 / (num_regions * sizes[1:])
  order = np.argsort(-maps.ravel(), kind="stable")
  scores = maps.ravel()[order]
  regions = regions[order]
  anomalous = regions > 0
  # Only the last pixel of a run of equal scores is a threshold.
  last = np.append(scores[1:] != scores[:-1], True)
  curves = []
  for cumulative in (
    np.cumsum(~anomalous) / np.sum(~anomalous),
    np.cumsum(anomalous) / np.sum(anomalous),
    np.cumsum(weight_pro[regions]),
  ):
    curve = np.concatenate([[0.0], cumulative[last]])
    curve[-1] = 1.0  # exact, not 1 up to rounding
    curves.append(curve)
  return tuple(curves)


def _area(x: np.ndarray, y: np.ndarray, max_x: float) -> float:
  """Trapezoid area under y(x) over [0, max_x], divided by max_x.

  Args:
    x: [T] non-decreasing, x[0] = 0, x[-1] = 1.
    y: [T] curve values.
    max_x: the limit, in (0, 1]; y is interpolated linearly there.
  """
  # x[0] = 0 < max_x <= 1 = x[-1], so end is in [1, T - 1].
  end = int(np.searchsorted(x, max_x, side="left"))
  x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
  x = np.append(x[:end], max_x)
  y = np.append(y[:end], y0 + (y1 - y0) * (max_x - x0) / (x1 - x0))
  return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / max_x)


def _check_max_fpr(max_fpr: float) -> None:
  if not 0.0 < max_fpr <= 1.0:
    raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")


def pixel_metrics(
  maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3
) -> dict[str, float]:
  """`pixel_auroc` and `aupro` from one sort of the pixels.

  Args:
    maps: [N, H, W] float anomaly maps (higher = more anomalous).
    masks: [N, H, W] ground truth, 1 anomalous, 0 normal; both must occur.
    max_fpr: the FPR limit of the AUPRO.

  Returns:
    {"pixel_auroc": float, "aupro": float}.
  """
  _check_max_fpr(max_fpr)
  fpr, tpr, pro = _curves(maps, masks)
  return {
    "pixel_auroc": _area(fpr, tpr, 1.0),
    "aupro": _area(fpr, pro, max_fpr),
  }


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
  """AUROC of pixel scores over all pixels of all images.

  Args:
    maps: [N, H, W] float anomaly maps (higher = more anomalous).
    masks: [N, H, W] ground truth, 1 anomalous, 0 normal; both must occur.

  Returns:
    The pixel AUROC; tied scores count half, as in `image_metrics`.
  """
  fpr, tpr, _ = _curves(maps, masks)
  return _area(fpr, tpr, 1.0)


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
  """Normalised area under the PRO curve up to `max_fpr` (MVTec AD).

  PRO is integrated over FPR in [0, max_fpr] with the trapezoid rule,
  linearly interpolated at exactly `max_fpr`, and divided by `max_fpr`, so a
  perfect map scores 1. Regions are the 8-connected components of each
  image's mask; FPR counts the normal pixels of all images (`_curves`).

  Args:
    maps: [N, H, W] float anomaly maps (higher = more anomalous).
    masks: [N, H, W] ground truth in {0, 1}; both values must occur.
    max_fpr: the FPR limit, in (0, 1].

  Returns:
    AUPRO in [0, 1].
  """
  _check_max_fpr(max_fpr)
  fpr, _, pro = _curves(maps, masks)
  return _area(fpr, pro, max_fpr)
