"""Reading and writing flat tensor files: ``.safetensors``, ``.npz``, (with PyTorch) ``.pth`` and
(with h5py) Keras' HDF5 weight files ``.h5``.

Every reader returns ``(tensors, metadata)``: ``tensors`` maps key -> ``numpy.ndarray`` exactly as
stored (no layout conversion here), ``metadata`` is a ``dict[str, str]`` (safetensors' header
metadata; empty for the other formats). Nothing is unpickled: ``.safetensors`` and ``.npz`` are
read with numpy only (``np.load(allow_pickle=False)``), and ``.pth`` / ``.pt`` / ``.bin`` files go
through ``torch.load(..., weights_only=True)``, PyTorch's restricted loader, imported lazily.
Keras ``.h5`` files (the ``keras.applications`` ImageNet weights, ``model.save("m.h5")``,
``model.save_weights`` of Keras 2) are read with h5py, keyed ``"layer/weight"`` (e.g.
``conv2_block1_1_conv/kernel``).

Every failure to read or write is a :class:`~fcnjax.weights.errors.WeightsError` (mostly
:class:`~fcnjax.weights.errors.FormatError`) whose message starts with ``"PATH: "``; the
underlying exception (safetensors, zipfile, torch...) is chained as ``__cause__``.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from fcnjax.weights.errors import FormatError, WeightsFileNotFound, about_file

SAFETENSORS_EXTS = (".safetensors",)
NPZ_EXTS = (".npz",)
TORCH_EXTS = (".pth", ".pt", ".bin", ".ckpt")
KERAS_EXTS = (".h5", ".hdf5")

# Keys under which training checkpoints commonly nest their state dict (pytorch-fcn's own
# training checkpoints use "model_state_dict").
_NESTED_STATE_KEYS = ("model_state_dict", "state_dict", "model")


def _ext(path) -> str:
  return os.path.splitext(os.fspath(path))[1].lower()


def _reason(e: BaseException, *, with_type: bool = False, limit: int = 200) -> str:
  """A one-line description of ``e`` for an error message: its first line (or the line of a
  torch ``WeightsUnpickler error``), cut to the first sentence when longer than ``limit``."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  picked = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
  picked = picked.replace("Error while deserializing header: ", "")
  if isinstance(e, ValueError) and "contains pickled" in picked:  # np.load on a non-zip file
    picked = "not a zip archive (numpy would unpickle it, which is refused)"
  if len(picked) > limit:
    cut = picked.find(". ")
    picked = picked[:cut + 1] if 0 < cut < limit else picked[:limit - 3] + "..."
  if with_type or not picked:
    picked = f"{type(e).__name__}: {picked}" if picked else type(e).__name__
  return picked


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read a ``.safetensors`` file with numpy; returns ``(tensors, header metadata)``.

  Raises :class:`FormatError` ``"PATH: not a readable safetensors file (truncated, empty or not
  safetensors: REASON)"`` when the header cannot be parsed, and ``"PATH: tensor 'KEY' cannot be
  read with numpy (REASON)"`` for a tensor numpy cannot represent (e.g. bfloat16).
  """
  from safetensors import safe_open
  try:
    f = safe_open(os.fspath(path), framework="numpy")
  except Exception as e:  # noqa: BLE001 (SafetensorError, OSError, ...)
    raise FormatError(f"{path}: not a readable safetensors file (truncated, empty or not "
                      f"safetensors: {_reason(e)})") from e
  tensors = {}
  with f:
    metadata = dict(f.metadata() or {})
    for k in f.keys():
      try:
        tensors[k] = f.get_tensor(k)
      except Exception as e:  # noqa: BLE001
        raise FormatError(f"{path}: tensor {k!r} cannot be read with numpy ({_reason(e)})",
                          key=k) from e
  return tensors, metadata


def read_npz(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read an ``.npz`` archive (no pickle allowed); returns ``(tensors, {})``.

  Raises :class:`FormatError`: ``"PATH: not a readable npz file (truncated, empty or not npz:
  REASON)"`` when the archive cannot be opened (or is a single ``.npy``), ``"PATH: entry 'KEY'
  holds object data; cannot read it without unpickling (...)"`` for object arrays, and ``"PATH:
  entry 'KEY' cannot be read (damaged archive: REASON)"`` for a damaged member.
  """
  try:
    z = np.load(os.fspath(path), allow_pickle=False)
  except Exception as e:  # noqa: BLE001 (BadZipFile, EOFError, OSError, ValueError: "pickled")
    raise FormatError(f"{path}: not a readable npz file (truncated, empty or not npz: "
                      f"{_reason(e, with_type=True)})") from e
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise FormatError(f"{path}: not a readable npz file (truncated, empty or not npz: a single "
                      f".npy array, not an npz archive of named arrays)")
  tensors = {}
  with z:
    for k in z.files:
      try:
        tensors[k] = np.asarray(z[k])
      except ValueError as e:
        if "pickle" in str(e):  # object arrays need pickle
          raise FormatError(f"{path}: entry {k!r} holds object data; cannot read it without "
                            f"unpickling ({_reason(e)})", key=k) from e
        raise FormatError(f"{path}: entry {k!r} cannot be read (damaged archive: "
                          f"{_reason(e, with_type=True)})", key=k) from e
      except Exception as e:  # noqa: BLE001 (BadZipFile: bad CRC, zlib.error, EOFError, ...)
        raise FormatError(f"{path}: entry {k!r} cannot be read (damaged archive: "
                          f"{_reason(e, with_type=True)})", key=k) from e
  return tensors, {}


def _import_torch(path=None):
  try:
    import torch  # noqa: PLC0415 (lazy on purpose: PyTorch is optional)
  except ImportError as e:
    prefix = f"{path}: " if path is not None else ""
    raise FormatError(
        f"{prefix}reading .pth/.pt files needs PyTorch (pip install 'fcnjax[torch]'); or convert "
        "the file once elsewhere with `python -m fcnjax.weights convert` and use the "
        ".safetensors") from e
  return torch


def read_torch(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read a PyTorch state dict with ``torch.load(..., weights_only=True)`` (never a full unpickle).

  Accepts a flat ``{name: tensor}`` dict, or one nested under ``model_state_dict`` /
  ``state_dict`` / ``model`` (training checkpoints). Tensors become float32/int numpy arrays.

  Raises :class:`FormatError`: ``"PATH: torch.load(weights_only=True) refused the file: it holds
  objects other than tensors (REASON)"``, ``"PATH: not a readable PyTorch file (truncated, empty
  or not a torch.save file: torch.load(weights_only=True) failed: REASON)"``, or names the entry
  that is not a (convertible) tensor.
  """
  torch = _import_torch(path)
  try:
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 (torch raises UnpicklingError, RuntimeError, ...)
    if "weights only load failed" in str(e).lower() or "WeightsUnpickler" in str(e):
      raise FormatError(f"{path}: torch.load(weights_only=True) refused the file: it holds "
                        f"objects other than tensors ({_reason(e)})") from e
    raise FormatError(f"{path}: not a readable PyTorch file (truncated, empty or not a torch.save "
                      f"file: torch.load(weights_only=True) failed: "
                      f"{_reason(e, with_type=True)})") from e
  if isinstance(obj, Mapping):
    for k in _NESTED_STATE_KEYS:
      if k in obj and isinstance(obj[k], Mapping):
        obj = obj[k]
        break
  if not isinstance(obj, Mapping):
    raise FormatError(f"{path}: expected a state dict (a mapping of name -> tensor), "
                      f"got {type(obj).__name__}")
  tensors = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise FormatError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor", key=str(k))
    try:
      v = v.detach().cpu()
      if v.is_floating_point() and v.dtype != torch.float64:
        v = v.float()
      tensors[str(k)] = v.numpy().copy()
    except Exception as e:  # noqa: BLE001 (sparse, quantized, meta tensors...)
      raise FormatError(f"{path}: entry {k!r} ({v.dtype}, {v.layout}) cannot be converted to a "
                        f"numpy array ({_reason(e)})", key=str(k)) from e
  return tensors, {}


def read_keras_h5(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read a Keras HDF5 weight file in the layer-named format (Keras 2's, and Keras 3's for a
  ``.h5`` name): the root (or its ``model_weights`` group) lists ``layer_names``, each layer
  group its ``weight_names`` (``"conv1_conv/kernel:0"``). Keys are ``"layer/weight"`` without
  the ``:0``; arrays as stored (Keras kernels are HWIO, as fcnjax's). Metadata: ``keras_version``
  and ``backend`` where the file has them."""
  try:
    import h5py  # noqa: PLC0415 (lazy on purpose: only Keras files need it)
  except ImportError as e:
    raise FormatError(f"{path}: reading Keras .h5 files needs h5py (pip install h5py)") from e
  try:
    f = h5py.File(os.fspath(path), "r")
  except OSError as e:
    raise FormatError(f"{path}: not a readable HDF5 file ({_reason(e)})") from e
  with f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
      layers = ", ".join(list(root.keys())[:4])
      raise FormatError(
          f"{path}: not a layer-named Keras weight file (no 'layer_names'; top-level groups: "
          f"{layers or 'none'}). A Keras 3 '.weights.h5' names layers by creation order; save "
          "the model with model.save('model.h5') instead")
    tensors = {}
    try:
      for layer in root.attrs["layer_names"]:
        layer = layer.decode() if isinstance(layer, bytes) else str(layer)
        g = root[layer]
        for name in g.attrs.get("weight_names", []):
          name = name.decode() if isinstance(name, bytes) else str(name)
          key = name.split(":", 1)[0]
          if "/" not in key:
            key = f"{layer}/{key}"
          tensors[key] = np.asarray(g[name])
    except (KeyError, OSError, ValueError) as e:
      raise FormatError(f"{path}: damaged Keras weight file ({_reason(e, with_type=True)})") from e
    metadata = {k: (v.decode() if isinstance(v, bytes) else str(v))
                for k, v in f.attrs.items() if k in ("keras_version", "backend")}
  return tensors, metadata


def read(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read any supported weight file by extension; returns ``(tensors, metadata)``.

  Every failure is a :class:`~fcnjax.weights.errors.WeightsError` whose message starts with the
  path: :class:`WeightsFileNotFound` (also a ``FileNotFoundError``) for a missing file,
  :class:`FormatError` for a directory, an unknown extension or an unreadable file.
  """
  try:
    p = os.fspath(path)
  except TypeError as e:
    raise FormatError(f"expected a weight file path or a mapping of arrays, got "
                      f"{type(path).__name__}") from e
  with about_file(p):  # every error names the file, and err.path is set
    ext = _ext(p)
    if not os.path.exists(p):
      raise WeightsFileNotFound(path)
    if os.path.isdir(p):
      raise FormatError(f"{path}: is a directory, not a weight file")
    if ext in SAFETENSORS_EXTS:
      return read_safetensors(path)
    if ext in NPZ_EXTS:
      return read_npz(path)
    if ext in TORCH_EXTS:
      return read_torch(path)
    if ext in KERAS_EXTS:
      return read_keras_h5(path)
    raise FormatError(f"{path}: unknown weight file extension {ext!r}; expected one of "
                      f"{SAFETENSORS_EXTS + NPZ_EXTS + TORCH_EXTS + KERAS_EXTS}")


def write_safetensors(path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write ``tensors`` (contiguous numpy arrays) and string ``metadata`` to ``path``.

  A failed write (missing directory, no permission, disk full...) is a :class:`FormatError`
  ``"PATH: cannot write the weight file (REASON)"``.
  """
  from safetensors.numpy import save_file
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
  try:
    save_file(arrays, os.fspath(path),
              metadata={str(k): str(v) for k, v in (metadata or {}).items()})
  except Exception as e:  # noqa: BLE001 (SafetensorError, OSError)
    raise FormatError(f"{path}: cannot write the weight file ({_reason(e)})") from e


def write_npz(path, tensors: Mapping[str, np.ndarray]) -> None:
  """Write ``tensors`` to an uncompressed ``.npz`` (no metadata); failures as
  :func:`write_safetensors`."""
  try:
    np.savez(os.fspath(path), **{k: np.asarray(v) for k, v in tensors.items()})
  except OSError as e:
    raise FormatError(f"{path}: cannot write the weight file ({_reason(e)})") from e
