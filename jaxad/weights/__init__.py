"""Reading PyTorch checkpoints without torch, and converters to Flax.

`read_state_dict(path)` returns a flat {name: numpy array} dict from
* `.safetensors` files (parsed directly: 8-byte little-endian header length,
  a JSON header of dtype / shape / data_offsets, then raw bytes);
* `torch.save` zip files (`*/data.pkl` plus raw storages `*/data/<key>`),
  the format of torch >= 1.6;
* `torch.save` legacy files (consecutive pickles, then the raw storages), the
  format of older torchvision checkpoints such as `wide_resnet50_2-95faca4d`.

Pickles are read by a restricted unpickler: it resolves only the globals a
state dict needs (`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`,
the typed storage classes, `collections.OrderedDict`) to local stand-ins and
refuses any other, so a checkpoint cannot run code. Tensors may be strided
views of a shared storage; they are copied out, contiguous.

Converters: `jaxad.weights.torchvision` (ResNet / Wide-ResNet).
"""

import collections
import io
import json
import os
import pickle
import struct
import zipfile

import jax.numpy as jnp
import numpy as np

# safetensors dtype names (the spec's full list of numeric types we support).
_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": jnp.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
# torch's typed storage classes, as named in pickles.
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": jnp.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A checkpoint's tensors by name, whatever of the three formats it is.

  Args:
    path: a `.safetensors` file, or a file written by `torch.save` (zip or
      legacy) holding a state dict (possibly nested under "state_dict" or
      "model"); other nested dicts become dotted keys ("a.b").

  Returns:
    {name: array} in file order; arrays are C-contiguous host numpy arrays
    with the checkpoint's dtype (bfloat16 as `jnp.bfloat16`).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(9)
  if zipfile.is_zipfile(path):
    return read_torch_zip(path)
  # safetensors first: its 8-byte length may well start with 0x80 too.
  if len(head) == 9 and head[8:9] == b"{":
    return read_safetensors(path)
  if head[:1] == b"\x80":  # pickle PROTO opcode: torch's legacy format
    return read_torch_legacy(path)
  raise ValueError(
    f"{path}: neither safetensors, nor a torch.save zip or legacy file "
    f"(first bytes {head!r})"
  )


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file (see `read_state_dict`)."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
      raise ValueError(f"{path}: header length {n} exceeds the file size")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  # Memory-map so that only the copies of the tensors are held in memory.
  raw = (
    np.memmap(path, np.uint8, mode="r", offset=8 + n) if size > 8 + n else b""
  )
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name}: unsupported dtype {info}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != int(np.prod(shape)) * dtype.itemsize or end > len(raw):
      raise ValueError(
        f"{path}: tensor {name}: data_offsets {info['data_offsets']} do not "
        f"fit shape {shape} of {dtype} in a {len(raw)}-byte buffer"
      )
    arr = np.frombuffer(raw[begin:end], dtype.newbyteorder("<"))
    out[name] = arr.astype(dtype).reshape(shape)  # native order, a copy
  del raw
  return out


class _Storage:
  """A typed storage as named by a pickle's persistent id."""

  def __init__(self, key: str, dtype, numel: int, view=None):
    self.key, self.dtype, self.numel, self.view = key, dtype, numel, view


class _TensorRef:
  """`_rebuild_tensor_v2`'s arguments; materialised once storages are read.

  The legacy format stores the storages *after* the pickle, so tensors can
  only be built at the end; the zip format uses the same path.
  """

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(
  storage, offset, size, stride, requires_grad, hooks, metadata=None
):
  del requires_grad, hooks, metadata  # autograd state: meaningless here
  return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, *state):
  del requires_grad, hooks, state
  return data


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


_ALLOWED = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only a state dict's globals; refuses everything else."""

  def __init__(self, file, *, path: str, legacy: bool):
    super().__init__(file)
    self.path, self.legacy = path, legacy
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[module, name]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
      f"{self.path}: refusing to load global {module}.{name}: only a state "
      "dict of tensors is accepted (allowed: "
      f"{sorted(f'{m}.{n}' for m, n in _ALLOWED)} and torch.<dtype>Storage)"
    )

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel);
    # legacy: ('storage', type, root_key, location, numel, view_metadata).
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(
        f"{self.path}: unsupported persistent id {pid!r}"
      )
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(
        f"{self.path}: storage {key} has type {storage_type!r}, not a typed "
        "torch storage"
      )
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type.dtype, numel)
    storage = self.storages[key]
    view = pid[5] if self.legacy and len(pid) > 5 else None
    if view is not None:  # (view_key, offset, size) into the root storage
      _, view_offset, view_size = view
      return _Storage(key, storage.dtype, view_size, view=view_offset)
    return storage


def _materialise(obj, read_storage, path):
  """Replaces every _TensorRef in a state dict with a numpy array."""
  cache = {}

  def tensor(ref: _TensorRef) -> np.ndarray:
    st = ref.storage
    if st.key not in cache:
      cache[st.key] = read_storage(st.key, st.dtype)
    data = cache[st.key]
    offset = ref.offset + (st.view or 0)
    size, stride = ref.size, ref.stride
    if len(size) != len(stride) or min(stride, default=0) < 0:
      raise ValueError(f"{path}: bad tensor size {size} / stride {stride}")
    if 0 in size:
      return np.zeros(size, st.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if offset < 0 or last >= data.size:
      raise ValueError(
        f"{path}: tensor of size {size}, stride {stride}, offset "
        f"{offset} reads past its storage {st.key} of {data.size} elements"
      )
    if not size:  # as_strided would return shape (1,) for a scalar
      return np.array(data[offset])
    view = np.lib.stride_tricks.as_strided(
      data[offset:],
      shape=size,
      strides=[s * data.itemsize for s in stride],
      writeable=False,
    )
    return view.copy()  # C-contiguous, writable, no longer tied to storage

  def walk(o):
    if isinstance(o, _TensorRef):
      return tensor(o)
    if isinstance(o, dict):
      return {k: walk(v) for k, v in o.items()}
    return o

  return walk(obj)


def _state_dict(obj, path) -> dict[str, np.ndarray]:
  """Unwraps {"state_dict": ...} / {"model": ...} and checks the values."""
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  out = {}

  def add(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):  # e.g. PPAD's {"prompt_learner_ctx": {...}}
        add(v, f"{prefix}{k}.")
      elif not isinstance(v, np.ndarray):
        key = f"{prefix}{k}"
        raise ValueError(f"{path}: entry {key!r} is a {type(v).__name__}")
      else:
        out[f"{prefix}{k}"] = v

  add(obj, "")
  return out


def _from_bytes(buf, dtype, count, *, big_endian=False) -> np.ndarray:
  dt = np.dtype(dtype)
  arr = np.frombuffer(buf, dt.newbyteorder(">" if big_endian else "<"), count)
  return arr.astype(dt)  # native byte order, and a writable copy


def read_torch_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict from a `torch.save` zip file (see `read_state_dict`)."""
  path = os.fspath(path)
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"{path}: expected one */data.pkl, found {pkls}")
    prefix = pkls[0][: -len("data.pkl")]
    names = set(zf.namelist())
    big = (
      prefix + "byteorder" in names
      and zf.read(prefix + "byteorder").strip() == b"big"
    )
    unpickler = _RestrictedUnpickler(
      io.BytesIO(zf.read(pkls[0])), path=path, legacy=False
    )
    obj = unpickler.load()

    def read_storage(key, dtype):
      st = unpickler.storages[key]
      buf = zf.read(f"{prefix}data/{key}")
      if len(buf) < st.numel * np.dtype(dtype).itemsize:
        raise ValueError(f"{path}: storage {key} is truncated")
      return _from_bytes(buf, dtype, st.numel, big_endian=big)

    return _state_dict(_materialise(obj, read_storage, path), path)


def read_torch_legacy(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict from a pre-1.6 `torch.save` file (see `read_state_dict`).

  Layout: pickles of the magic number, the protocol version and sys info,
  the object itself, then the list of storage keys; then, per key in that
  order, an int64 element count and the raw little-endian elements.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:

    def plain_pickle():
      return _RestrictedUnpickler(f, path=path, legacy=True).load()

    magic = plain_pickle()
    if magic != _LEGACY_MAGIC:
      raise ValueError(
        f"{path}: a pickle but not a torch.save file (magic {magic!r}); "
        "the pre-0.4 tar format is not supported"
      )
    if (version := plain_pickle()) != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported legacy protocol {version}")
    plain_pickle()  # sys info: endianness and type sizes of the writer
    unpickler = _RestrictedUnpickler(f, path=path, legacy=True)
    obj = unpickler.load()
    keys = plain_pickle()
    data = {}
    for key in keys:
      st = unpickler.storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      nbytes = numel * st.dtype.itemsize
      buf = f.read(nbytes)
      if len(buf) != nbytes:
        raise ValueError(f"{path}: storage {key} is truncated")
      data[str(key)] = _from_bytes(buf, st.dtype, numel)
  return _state_dict(
    _materialise(obj, lambda key, dtype: data[key], path), path
  )


MAX_LISTED = 12  # conversion errors listed in one message


def raise_if_errors(errors: list[str], what: str) -> None:
  """Raises ValueError listing (at most MAX_LISTED of) a converter's
  `errors`, e.g. unmapped keys and mismatched shapes, naming `what` ("the
  torchvision state dict")."""
  if errors:
    more = len(errors) - MAX_LISTED
    raise ValueError(
      f"{what} does not fit the model ({len(errors)} problems):\n  "
      + "\n  ".join(errors[:MAX_LISTED])
      + (f"\n  ... and {more} more" if more > 0 else "")
    )
