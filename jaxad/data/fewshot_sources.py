"""The data config of D²4FAD's few-shot cross-dataset setting: its
sources and target (METHODS.md §2.1, §2.4), checked without reading any
image; `jaxad.data.fewshot` loads what it describes.

Config (`data`):
  sources: entries, each a dict or a "key=value,key=value" string:
    format: `d24fad` (one dataset folder of the D²4FAD layout, see
      `d24fad_layout`) or a one-class layout of `layouts.build`
      (`folders`, `medmnist`, `mvtec`, `bmad`, `mtd`, `medad`);
    root: the dataset folder (medmnist: the .npz);
    name: defaults to the basename of root (medmnist: without `.npz`;
      mvtec: `-<category>` appended);
    support_root: the folder of fixed supports `<name>/train/shot<K>/
      good<K>/*`; defaults, for `d24fad`, to ROOT/med-kshot beside root;
    and the layout's own keys (LAYOUT_KEYS), e.g. normal_class.
  root: optional D²4FAD ROOT; each ROOT/<dataset>/ with train/good/
    becomes a `d24fad` entry, before those of `sources`.
  target: the name of the target entry. support_root: overrides the
    target entry's (a top-level key: changing it alone re-scores).
  shots: K. support: "auto" (the fixed folder when it exists, else a
    draw), "fixed" or "drawn". support_seed: seed of a drawn support.
  image_size (128), channels (3), cache_dir, split_seed: shared by all.
  max_source_images: at most this many training normals per source (a
    seeded subset, for quick runs); 0 (default) = all, as the original.
  exclude_sources: entries not trained on (names, or one "a,b" string),
    e.g. a source that shares an origin with the target (PneumoniaMNIST
    is derived from the Kermany images): it would leak the target.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
from typing import Any

import ml_collections

from jaxad.data import d24fad_layout, manifest

DataError = manifest.DataError
LAYOUT_KEYS = {
  "d24fad": (),
  "folders": ("normal_class", "split_seed"),
  "medmnist": ("normal_label", "split_seed"),
  "mvtec": ("category",),
  "bmad": (),
  "mtd": ("test_normal_fraction", "split_seed"),
  "medad": (),
}
FORMATS = tuple(LAYOUT_KEYS)
# skip_unreadable: this entry's undecodable test images are left out
# (listed in the log), e.g. MTD's defect images with empty masks.
COMMON_KEYS = ("format", "root", "name", "support_root", "skip_unreadable")
SUPPORT_MODES = ("auto", "fixed", "drawn")
# Entry values given as strings ("key=value") that are not strings.
_TYPES = {
  "split_seed": int,
  "normal_label": int,
  "test_normal_fraction": float,
  "skip_unreadable": lambda v: str(v).strip().lower() in ("1", "true", "yes"),
}


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset entry: its name, format, the data config its layout reads
  (entry keys + shared keys + unlabeled_size=0), its support root, and
  where the config gives it (for messages, e.g. "data.sources[1]")."""

  name: str
  format: str
  data: ml_collections.ConfigDict
  support_root: str = ""
  where: str = ""


def _as_dict(entry: Any, where: str) -> dict[str, Any]:
  """An entry (mapping or "k=v,k=v" string) as a dict without None values."""
  if isinstance(entry, str):
    out = {}
    for item in entry.split(","):
      key, sep, value = item.partition("=")
      if not sep:
        raise DataError(
          f"{where}: {item!r} is not key=value (an entry is a dict or a"
          " 'format=...,root=...' string)"
        )
      key, value = key.strip(), value.strip()
      try:
        out[key] = _TYPES.get(key, str)(value)
      except ValueError:
        raise DataError(f"{where}: {key}={value!r} is not a number") from None
    return out
  if hasattr(entry, "to_dict"):  # ml_collections.ConfigDict
    entry = entry.to_dict()
  if not isinstance(entry, collections.abc.Mapping):
    raise DataError(f"{where}: expected a dict or a string, got {entry!r}")
  return {str(k): v for k, v in entry.items() if v is not None}


def _source(entry: dict[str, Any], where: str, shared: dict) -> Source:
  """Checks one entry's keys (no disk access) and builds its data config."""
  fmt = entry.get("format", "")
  if fmt not in LAYOUT_KEYS:
    raise DataError(f"{where}: unknown format {fmt!r}; valid: {list(FORMATS)}")
  allowed = COMMON_KEYS + LAYOUT_KEYS[fmt]
  unknown = sorted(set(entry) - set(allowed))
  if unknown:
    raise DataError(
      f"{where}: unknown key(s) {unknown} for format {fmt!r}; valid keys:"
      f" {list(allowed)} (image_size, channels and cache_dir are shared:"
      " set them on data; split_seed defaults to data.split_seed)"
    )
  if not entry.get("root"):
    raise DataError(f"{where}: 'root' is empty")
  root = os.path.abspath(os.path.expanduser(str(entry["root"])))
  name = str(entry.get("name") or os.path.basename(root))
  if "name" not in entry and fmt == "medmnist" and name.endswith(".npz"):
    name = name[: -len(".npz")]
  if "name" not in entry and entry.get("category"):
    name += f"-{entry['category']}"
  if not name or name.startswith(".") or "/" in name or "\\" in name:
    raise DataError(f"{where}: invalid name {name!r} (a folder name)")
  support_root = str(entry.get("support_root") or "")
  if support_root:
    support_root = _support_dir(support_root, f"{where}.support_root")
  elif fmt == d24fad_layout.FORMAT:
    kshot = os.path.join(os.path.dirname(root), d24fad_layout.KSHOT)
    support_root = kshot if os.path.isdir(kshot) else ""
  layout = {k: entry[k] for k in LAYOUT_KEYS[fmt] if k in entry}
  data = dict(shared, format=fmt, root=root, unlabeled_size=0, **layout)
  if "skip_unreadable" in entry:
    data["skip_unreadable"] = bool(entry["skip_unreadable"])
  config = ml_collections.ConfigDict(data)
  return Source(name, fmt, config, support_root, where)


def _support_dir(path: str, key: str) -> str:
  """An explicitly set support root, absolute; it must be a folder (one
  that is set but missing is a typo, not "draw the supports")."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{key} not found: {path} (not a folder)")
  return path


def _names(value: Any) -> tuple[str, ...]:
  """A list of names, or one "a,b" string (handy on a command line)."""
  if isinstance(value, str):
    value = value.split(",")
  return tuple(n.strip() for n in value or () if n.strip())


def check_config(data: Any) -> tuple[tuple[Source, ...], int]:
  """Parses and checks the few-shot data config; reads no image.

  Args:
    data: the `data` config (see the module docstring).

  Returns:
    (every entry, in order, the target's index).

  Raises:
    DataError: an unknown format, key, target or support mode, a bad name,
      an entry listed twice (same name, or same format, root and
      category), an excluded name that is no source, no source left, or
      shots < 1; each names the entry or key.
    FileNotFoundError: a missing data.root, a missing root of an entry
      that is used (named as in the config, e.g. data.sources[1].root), or
      a support_root that is set but is no folder.
  """
  shared = {
    "image_size": int(manifest.get(data, "image_size", 128)),
    "channels": int(manifest.get(data, "channels", 3)),
    "cache_dir": str(manifest.get(data, "cache_dir", "")),
    "split_seed": int(manifest.get(data, "split_seed", 0)),
    "intensity": str(manifest.get(data, "intensity", "auto")),
  }
  manifest.channels(ml_collections.ConfigDict(shared))
  entries = []
  root = str(manifest.get(data, "root", ""))
  if root:
    root = os.path.abspath(os.path.expanduser(root))
    for d in d24fad_layout.datasets(root):
      entries.append(
        _source(
          {"format": "d24fad", "root": os.path.join(root, d)},
          f"data.root {root}: {d}",
          shared,
        )
      )
  for i, entry in enumerate(manifest.get(data, "sources", ()) or ()):
    where = f"data.sources[{i}]"
    entries.append(_source(_as_dict(entry, where), where, shared))
  seen: dict[Any, str] = {}
  for e in entries:
    for key in (e.name, (e.format, e.data.root, e.data.get("category"))):
      if key in seen:
        raise DataError(
          f"Dataset {e.name!r} ({e.format} {e.data.root}) is listed twice"
          f" (also as {seen[key]!r}); each dataset is one entry of"
          " data.sources (the target too)"
        )
      seen[key] = e.name
  names = [e.name for e in entries]
  target = str(manifest.get(data, "target", ""))
  if target not in names:
    raise DataError(f"data.target={target!r} is not an entry; names: {names}")
  if len(entries) < 2:
    raise DataError(
      f"No source dataset: data.sources lists only the target {target!r}"
    )
  shots = int(manifest.get(data, "shots", 0))
  if shots < 1:
    raise DataError(f"data.shots must be >= 1, got {shots}")
  mode = str(manifest.get(data, "support", "auto"))
  if mode not in SUPPORT_MODES:
    raise DataError(f"data.support={mode!r}; valid: {list(SUPPORT_MODES)}")
  excluded = _names(manifest.get(data, "exclude_sources", ()))
  for name in excluded:
    if name not in names or name == target:
      raise DataError(
        f"data.exclude_sources names {name!r}, which is not a source;"
        f" sources: {[n for n in names if n != target]}"
      )
  entries = [e for e in entries if e.name not in excluded]
  names = [e.name for e in entries]
  if len(entries) < 2:
    raise DataError(
      f"No source dataset left after data.exclude_sources={list(excluded)}"
    )
  for e in entries:  # before anything is prepared: name the entry
    if not os.path.exists(e.data.root):
      raise FileNotFoundError(
        f"{e.where}.root not found: {e.data.root} (entry {e.name!r})"
      )
  t = names.index(target)
  support_root = str(manifest.get(data, "support_root", ""))
  if support_root:  # top-level, so that changing it alone can re-score
    support_root = _support_dir(support_root, "data.support_root")
    entries[t] = dataclasses.replace(entries[t], support_root=support_root)
  return tuple(entries), t
