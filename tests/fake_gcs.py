"""A fake `gs://` for tests: buckets are folders under a local root.

What a real bucket needs three libraries for, routed to the local root:

* `etils.epath` (jaxad's files, orbax's metadata): through fsspec's `gcs`
  protocol, here a local file system that maps `gs://b/p` to `ROOT/b/p`
  (gcsfs in a real install, `pip install 'jaxad[gcs]'`);
* tensorstore (orbax's array data): orbax hands it `gs://` paths for its
  native GCS driver; `_normalize_path` is patched to give it `ROOT/b/p`
  instead, so orbax takes its local-file branch for the array data only;
* orbax's bucket query (hierarchical namespace or not, through
  google-cloud-storage): answered "no", as for a plain bucket.

jaxad itself is not patched: everything it does with a `gs://` workdir is
what it does with a real one.
"""

import contextlib
import importlib
import os
from collections.abc import Iterator

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

_ROOT: list[str] = []  # the active root (a stack: contexts may nest)
# fsspec's registry dict (`fsspec.registry` is a read-only view of it).
_REGISTRY = importlib.import_module("fsspec.registry")._registry


def _local(path: str) -> str:
  if path.startswith("gs://"):
    return os.path.join(_ROOT[-1], path[len("gs://") :])
  return path


class _LocalBuckets(LocalFileSystem):
  """fsspec's local file system, serving `gs://bucket/path` from ROOT."""

  protocol = ("gs", "gcs")
  root_marker = ""

  def __init__(self, *args, **kwargs):
    del args, kwargs  # gcsfs options (e.g. finalize_on_close)
    super().__init__()

  @classmethod
  def _strip_protocol(cls, path):
    return super()._strip_protocol(_local(os.fspath(path)))

  def glob(self, path, **kwargs):
    # gcsfs returns "bucket/path" (epath adds "gs://" back).
    root = _ROOT[-1] + "/"
    return [
      p[len(root) :] if p.startswith(root) else p
      for p in super().glob(path, **kwargs)
    ]


@contextlib.contextmanager
def buckets(root: str) -> Iterator[str]:
  """Within the block, `gs://b/p` is `root/b/p`; yields `root`."""
  _ROOT.append(root)
  old = {name: _REGISTRY.get(name) for name in ("gcs", "gs")}
  normalize = tensorstore_utils._normalize_path
  hns = gcs_utils.is_hierarchical_namespace_enabled
  for name in old:
    fsspec.register_implementation(name, _LocalBuckets, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  tensorstore_utils._normalize_path = lambda p: _local(normalize(p))
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
  try:
    yield root
  finally:
    tensorstore_utils._normalize_path = normalize
    gcs_utils.is_hierarchical_namespace_enabled = hns
    for name, cls in old.items():
      if cls is None:
        _REGISTRY.pop(name, None)
      else:
        _REGISTRY[name] = cls
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    _ROOT.pop()
