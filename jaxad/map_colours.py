"""Colour scales of anomaly maps: one linear scale per map type, clipped to
percentiles of that map's values (so that a few extreme pixels do not turn
the rest into one colour), stated on the figure.

Used by the report's map grid (`jaxad.report`); `colour_scale` takes the
clip range and what the maps are, for other overlays of maps.
"""

from typing import NamedTuple

import numpy as np

# The map colour scale: these percentiles of a map type's pixels over the
# test set (the same as `jaxad.predict --overlays`).
MAP_PERCENTILES = (0.5, 99.5)
# How maps are drawn over their image (imshow keywords).
OVERLAY = dict(cmap="jet", alpha=0.45)
_MAX_PIXELS = 1 << 24  # values a colour scale's percentiles are taken of


class Scale(NamedTuple):
  """A colour scale: `lo`..`hi` in map units; `basis` says how it was
  chosen (e.g. "p0.5..p99.5 of the test maps"); `extend` is matplotlib's
  colour-bar `extend` ("neither", "min", "max", "both"): the ends with
  pixels beyond the scale."""

  lo: float
  hi: float
  basis: str
  extend: str


def colour_scale(
  maps: np.ndarray,
  percentiles: tuple[float, float] = MAP_PERCENTILES,
  source: str = "the test maps",
) -> Scale:
  """One colour scale for a stack of maps, clipped to percentiles.

  Args:
    maps: [..., H, W] float (any float dtype) maps of one type; values
      that are not finite are ignored. Above _MAX_PIXELS values, every k-th
      (evenly strided, deterministic) is used: the percentiles of 16M
      values are within a hair of the full set's, at bounded memory.
    percentiles: (low, high), 0 <= low < high <= 100: the scale is
      `np.percentile(values, percentiles)` (numpy's default linear
      interpolation).
    source: what `maps` are, for `basis` ("the test maps").

  Returns:
    A `Scale`; where the two percentiles are equal (a nearly constant map),
    the maps' min..max instead, said so in `basis`.

  Raises:
    ValueError: percentiles out of order or outside [0, 100]; no finite
      value in `maps`.
  """
  p0, p1 = (float(p) for p in percentiles)
  if not 0 <= p0 < p1 <= 100:
    raise ValueError(
      f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}"
    )
  m = np.asarray(maps)
  flat = m.reshape(-1)[:: max(1, -(-m.size // _MAX_PIXELS))]
  flat = flat.astype(np.float32)  # float16 percentiles would round
  finite = flat[np.isfinite(flat)]
  if not finite.size:
    raise ValueError(
      f"{source}: no finite value to set a colour scale ({m.shape})"
    )
  lo, hi = (float(v) for v in np.percentile(finite, (p0, p1)))
  basis = f"p{p0:g}..p{p1:g} of {source}"
  if hi <= lo:
    lo, hi = float(finite.min()), float(finite.max())
    basis = f"min..max of {source} (p{p0:g} = p{p1:g})"
  below, above = bool(finite.min() < lo), bool(finite.max() > hi)
  extend = {(0, 0): "neither", (1, 0): "min", (0, 1): "max"}.get(
    (below, above), "both"
  )
  return Scale(lo, hi, basis, extend)


def scale_label(name: str, scale: Scale) -> str:
  """The colour-bar text of a map's scale: what, range, how chosen."""
  return f"{name} map: {scale.lo:.3g}..{scale.hi:.3g}\n({scale.basis})"
