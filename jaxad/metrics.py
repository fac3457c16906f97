"""Host-side evaluation metrics (numpy / scikit-learn)."""

import numpy as np
from sklearn import metrics as skm


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """AUROC and average precision of image scores (higher = more anomalous).

  Args:
    scores: [N] float scores.
    labels: [N] 0 normal, 1 abnormal; both classes must be present.

  Returns:
    {"auroc": float, "ap": float}.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(
      f"scores {scores.shape} and labels {labels.shape} must "
      "be matching 1-d arrays"
    )
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
