"""Workdir files anywhere: local folders, `gs://` buckets (and the other
URIs `etils.epath` knows: `s3://`, `az://`).

Every file jaxad reads or writes in a workdir (config.json, split.json,
metrics.jsonl, eval.json, scores, maps, the report, checkpoints through
orbax, predictions, exports) goes through `etils.epath.Path`, so a
`gs://bucket/run` workdir is written to the bucket, never to
`$PWD/gs:/bucket/run`. Local paths are made absolute once (a run that
changes directory keeps writing to the same place).

Writes are whole-file: locally a temporary file and a rename (a crash never
leaves half a file); in a bucket one object upload, which is atomic by
itself (an object appears whole or not at all). Buckets have no append:
`append_line` rewrites the file, which is fine for jaxad's small logs.
"""

import io
import json
import os
import tempfile
from typing import Any

import numpy as np
from etils import epath

# What `pip install 'jaxad[gcs]'` adds; see pyproject.toml.
_INSTALL = {
  "gs": "pip install 'jaxad[gcs]' (from a checkout: pip install -e"
  " '.[gcs]'; gcsfs and google-cloud-storage)"
}


class UnreachableError(ValueError):
  """A URI whose file system is not installed (the message names it)."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI (`gs://...`) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """`path` as a string: local paths absolute (with `~` expanded), URIs as
  given (without a trailing slash); `file://` URIs are local paths."""
  text = os.fspath(path)
  if text.startswith("file://"):
    text = text[len("file://") :]
  if is_remote(text):
    return text.rstrip("/")
  return os.path.abspath(os.path.expanduser(text))


def path(p: str | os.PathLike) -> epath.Path:
  """`absolute(p)` as an `epath.Path`.

  Raises:
    UnreachableError: a URI whose scheme this installation cannot reach
      (e.g. `gs://` without gcsfs), naming what to install.
  """
  text = absolute(p)
  if is_remote(text):
    check_reachable(text)
  return epath.Path(text)


def check_reachable(uri: str) -> None:
  """Raises UnreachableError unless a file system for `uri`'s scheme is
  installed (epath uses fsspec's, e.g. gcsfs for `gs://`)."""
  import fsspec  # epath's own dependency for URIs

  scheme = uri.split("://", 1)[0]
  try:
    fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
  except (ImportError, ValueError) as e:
    hint = _INSTALL.get(scheme, f"an fsspec file system for {scheme}://")
    raise UnreachableError(
      f"{uri}: {scheme}:// paths need {hint}; not installed here ({e})"
    ) from None


def read_text(p: str | os.PathLike) -> str | None:
  """The text at `p`, or None when there is no such file."""
  f = path(p)
  return f.read_text() if f.exists() else None


def write_text(p: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `p` whole, as `write_bytes`."""
  write_bytes(p, text.encode())


def _publish(tmp: str, f: epath.Path) -> None:
  """Renames the temporary file `tmp` to `f`, with the mode `open` would
  have given it (mkstemp makes 0600 files: unreadable to others)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, f)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `p` whole (see the module docstring), creating the
  folder."""
  f = path(p)
  f.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(f):
    f.write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.name}.")
  with os.fdopen(fd, "wb") as out:
    out.write(data)
  _publish(tmp, f)


def write_json(p: str | os.PathLike, record: Any, indent: int = 1) -> None:
  """`record` as JSON at `p`, written whole (`write_text`)."""
  write_text(p, json.dumps(record, indent=indent))


def append_line(p: str | os.PathLike, line: str) -> None:
  """Appends `line` and a newline to the text file `p` (created if
  missing). Locally a plain append; in a bucket (no append there) the
  file is rewritten with the line added."""
  f = path(p)
  if not is_remote(f):
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as out:
      out.write(line + "\n")
    return
  write_text(f, (read_text(f) or "") + line + "\n")


def write_npz(p: str | os.PathLike, compressed: bool = False, **arrays) -> None:
  """`np.savez` (or `np.savez_compressed`) of `arrays` to `p`, written
  whole (`write_bytes`)."""
  buffer = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
  write_bytes(p, buffer.getvalue())


def write_figure(fig, p: str | os.PathLike, dpi: float | None = None) -> None:
  """A matplotlib figure as a PNG at `p`, written whole (`write_bytes`)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  write_bytes(p, buffer.getvalue())
