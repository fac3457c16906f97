"""Duplicate images across the splits of a run (leakage), found before any
image is decoded.

An image that is trained on (a known normal, the unlabeled pool) and also
scored (the test split, or the calibration normals that set the decision
threshold) inflates every metric, silently. `check` refuses such
duplicates, naming the pairs; `data.allow_duplicates=true` keeps them with
a warning (e.g. a dataset with known in-set duplicates whose split is
fixed by others).

Two manifest entries are the same image when
* their files are the same file: same (device, inode) after following
  symlinks, so the same path, a symlink to it or a hard link; or
* their contents are identical: the SHA-256 of the file's bytes
  (`hashlib.file_digest`, read in chunks), or of the raw pixels (shape,
  dtype and bytes) for npz-backed entries.

Only files whose size equals that of a file in another group are hashed
(files of different sizes cannot be identical), so the check costs one
`os.stat` per file plus reading the few files whose size collides. The
same image twice inside one group (e.g. two identical test images) is not
leakage and is not reported.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import hashlib
import itertools
import os
import time
from typing import Any

import numpy as np
from absl import logging

from jaxad.data import manifest

DataError = manifest.DataError
# Pairs named in the error; the rest are counted.
SHOWN = 5
ALLOW_KEY = "data.allow_duplicates"

Groups = collections.abc.Mapping[str, collections.abc.Sequence[manifest.Entry]]


@dataclasses.dataclass(frozen=True)
class Duplicate:
  """One pair of entries, in two groups, that hold the same image.

  Attributes:
    groups: the two group names, in the order of the groups given.
    names: the two entries' names.
    how: "same file", "identical bytes" or "identical pixels".
  """

  groups: tuple[str, str]
  names: tuple[str, str]
  how: str

  def __str__(self) -> str:
    (ga, gb), (na, nb) = self.groups, self.names
    return f"{ga} {na!r} and {gb} {nb!r} ({self.how})"


def allowed(data: Any) -> bool:
  """`data.allow_duplicates` (default False), which must be a bool.

  Raises:
    DataError: another value (naming the key).
  """
  value = manifest.get(data, "allow_duplicates", False)
  if not isinstance(value, bool | np.bool_):
    raise DataError(f"{ALLOW_KEY} must be true or false, got {value!r}")
  return bool(value)


def _file_digest(path: str) -> bytes:
  """SHA-256 of a file, read in chunks; errors name the file."""
  try:
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").digest()
  except OSError as e:
    raise DataError(f"Cannot read {path}: {e}") from e


def _pixel_digest(entry: manifest.Entry) -> bytes:
  """SHA-256 of an npz-backed entry's pixels, with their shape and dtype."""
  pixels = np.ascontiguousarray(entry.source())
  h = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
  h.update(pixels.tobytes())
  return h.digest()


def _keys(groups: Groups) -> tuple[dict, dict]:
  """The identity of every entry, as ((group, index) -> key, (group,
  index) -> inode, for file entries only).

  A file's key is its digest where its size equals that of another file
  seen in another group, else its inode; an npz entry's key is the digest
  of its pixels.
  """
  key_of: dict[tuple[str, int], Any] = {}
  inode_of: dict[tuple[str, int], tuple[int, int]] = {}
  path_of: dict[tuple[int, int], str] = {}
  groups_of: dict[tuple[int, int], set[str]] = collections.defaultdict(set)
  by_size: dict[int, set[tuple[int, int]]] = collections.defaultdict(set)
  for g, entries in groups.items():
    for i, e in enumerate(entries):
      if callable(e.source):
        key_of[g, i] = ("pixels", _pixel_digest(e))
        continue
      try:
        st = os.stat(e.source)
      except OSError as err:
        raise FileNotFoundError(
          f"Image file not found: {e.source} ({g} {e.name!r}): {err}"
        ) from None
      inode = (st.st_dev, st.st_ino)
      inode_of[g, i] = inode
      path_of.setdefault(inode, e.source)
      groups_of[inode].add(g)
      by_size[st.st_size].add(inode)
  digest: dict[tuple[int, int], bytes] = {}
  for inodes in by_size.values():
    # One inode is one file (in one group or several: the same file).
    seen_in = set().union(*(groups_of[n] for n in inodes))
    if len(inodes) > 1 and len(seen_in) > 1:
      for n in sorted(inodes):
        digest[n] = _file_digest(path_of[n])
  for gi, inode in inode_of.items():
    key_of[gi] = ("bytes", digest[inode]) if inode in digest else inode
  return key_of, inode_of


def find(
  groups: Groups,
  pairs: collections.abc.Collection[tuple[str, str]] | None = None,
) -> list[Duplicate]:
  """Every pair of entries in two different groups holding the same image.

  Args:
    groups: group name -> entries (e.g. a manifest's parts), in the order
      the pairs are reported.
    pairs: the (group, group) pairs to compare, either order; None: all.

  Returns:
    The duplicates, ordered by pair of groups, then by entry order.

  Raises:
    FileNotFoundError / DataError: a listed file cannot be read (naming it).
  """
  order = {g: k for k, g in enumerate(groups)}
  wanted = None
  if pairs is not None:
    wanted = {frozenset(p) for p in pairs}
    used = {g for p in pairs for g in p}
    groups = {g: v for g, v in groups.items() if g in used}
  key_of, inode_of = _keys(groups)
  members: dict[Any, list[tuple[str, int]]] = collections.defaultdict(list)
  for gi, key in key_of.items():
    members[key].append(gi)
  out = []
  for gis in members.values():
    if len({g for g, _ in gis}) < 2:
      continue
    gis.sort(key=lambda gi: (order[gi[0]], gi[1]))
    for a, b in itertools.combinations(gis, 2):
      if a[0] == b[0] or (wanted is not None and {a[0], b[0]} not in wanted):
        continue
      if a not in inode_of:
        how = "identical pixels"
      elif inode_of[a] == inode_of.get(b):
        how = "same file"
      else:
        how = "identical bytes"
      names = (groups[a[0]][a[1]].name, groups[b[0]][b[1]].name)
      rank = (order[a[0]], order[b[0]], a[1], b[1])
      out.append((rank, Duplicate((a[0], b[0]), names, how)))
  return [d for _, d in sorted(out, key=lambda x: x[0])]


def check(
  groups: Groups,
  *,
  allow: bool,
  what: str,
  pairs: collections.abc.Collection[tuple[str, str]] | None = None,
) -> list[Duplicate]:
  """Refuses images that appear in two groups (see the module docstring).

  Args:
    groups: group name -> entries, e.g. {"known normals": ..., "test":
      ...}; group names appear in the message.
    allow: `data.allow_duplicates`: warn instead of refusing.
    what: the dataset (its root), for the message.
    pairs: the group pairs compared; None: every pair.

  Returns:
    The duplicates found (empty, or kept because `allow`).

  Raises:
    DataError: duplicates and not `allow`; the message names the first
      SHOWN pairs, counts all of them per pair of groups, and says how to
      override.
  """
  start = time.perf_counter()
  dups = find(groups, pairs)
  logging.info(
    "%s: checked %d images for duplicates across %s in %.2f s",
    what,
    sum(len(v) for v in groups.values()),
    "/".join(groups),
    time.perf_counter() - start,
  )
  if not dups:
    return dups
  counts = collections.Counter(d.groups for d in dups)
  summary = ", ".join(f"{n} {a} / {b}" for (a, b), n in counts.items())
  shown = "; ".join(str(d) for d in dups[:SHOWN])
  more = f"; and {len(dups) - SHOWN} more" if len(dups) > SHOWN else ""
  message = (
    f"{what}: {len(dups)} pair(s) of identical images in two splits"
    f" ({summary}): {shown}{more}"
  )
  if allow:
    logging.warning("%s. Kept: %s=true", message, ALLOW_KEY)
    return dups
  raise DataError(
    f"{message}. An image in two splits leaks from one into the other (one"
    " trained on and scored as unseen inflates the results): remove one"
    f" file of each pair, or set {ALLOW_KEY}=true to keep them (e.g. for a"
    " dataset with known duplicates)."
  )


def check_target(
  sources: collections.abc.Mapping[str, collections.abc.Sequence[Any]],
  normal: collections.abc.Sequence[manifest.Entry],
  test: collections.abc.Sequence[manifest.Entry],
  *,
  target: str,
  allow: bool,
) -> list[Duplicate]:
  """`check` for a cross-dataset (few-shot) run: refuses an image in two of
  a source's training normals (trained on), the target's training normals
  (its supports and calibration normals) and the target's test split.
  Duplicates between two sources are no leak, and are not looked for.

  Args:
    sources: source name -> its training normals' entries.
    normal, test: the target's training normals and test entries.
    target: the target's name, for the message.
    allow: `data.allow_duplicates`.

  Returns / Raises: as `check`.
  """
  groups = {f"source {n!r} training normal": v for n, v in sources.items()}
  names = list(groups)
  tn, tt = f"target {target!r} training normal", f"target {target!r} test"
  groups |= {tn: normal, tt: test}
  pairs = [(s, tn) for s in names] + [(s, tt) for s in names] + [(tn, tt)]
  return check(groups, allow=allow, what=f"data.target={target!r}", pairs=pairs)
