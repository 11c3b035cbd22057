"""Reading and writing flat tensor files: ``.safetensors``, ``.npz`` and (with PyTorch) ``.pth``.

Every reader returns ``(tensors, metadata)``: ``tensors`` maps key -> ``numpy.ndarray`` exactly as
stored (no layout conversion here), ``metadata`` is a ``dict[str, str]`` (safetensors' header
metadata; empty for the other formats). Nothing is unpickled: ``.safetensors`` and ``.npz`` are
read with numpy only (``np.load(allow_pickle=False)``), and ``.pth`` / ``.pt`` / ``.bin`` files go
through ``torch.load(..., weights_only=True)``, PyTorch's restricted loader, imported lazily.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from fcnjax.weights.errors import FormatError

SAFETENSORS_EXTS = (".safetensors",)
NPZ_EXTS = (".npz",)
TORCH_EXTS = (".pth", ".pt", ".bin", ".ckpt")

# Keys under which training checkpoints commonly nest their state dict (pytorch-fcn's own
# training checkpoints use "model_state_dict").
_NESTED_STATE_KEYS = ("model_state_dict", "state_dict", "model")


def _ext(path) -> str:
  return os.path.splitext(os.fspath(path))[1].lower()


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read a ``.safetensors`` file with numpy; returns ``(tensors, header metadata)``."""
  from safetensors import safe_open
  tensors = {}
  with safe_open(os.fspath(path), framework="numpy") as f:
    metadata = dict(f.metadata() or {})
    for k in f.keys():
      tensors[k] = f.get_tensor(k)
  return tensors, metadata


def read_npz(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read an ``.npz`` archive (no pickle allowed); returns ``(tensors, {})``."""
  try:
    with np.load(os.fspath(path), allow_pickle=False) as z:
      return {k: np.asarray(z[k]) for k in z.files}, {}
  except ValueError as e:  # object arrays need pickle
    raise FormatError(f"{path}: cannot read without unpickling ({e})") from e


def _import_torch():
  try:
    import torch  # noqa: PLC0415 (lazy on purpose: PyTorch is optional)
  except ImportError as e:
    raise FormatError(
        "reading .pth/.pt files needs PyTorch (pip install 'fcnjax[torch]'); or convert the file "
        "once elsewhere with `python -m fcnjax.weights convert` and use the .safetensors") from e
  return torch


def read_torch(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read a PyTorch state dict with ``torch.load(..., weights_only=True)`` (never a full unpickle).

  Accepts a flat ``{name: tensor}`` dict, or one nested under ``model_state_dict`` /
  ``state_dict`` / ``model`` (training checkpoints). Tensors become float32/int numpy arrays.
  """
  torch = _import_torch()
  try:
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 (torch raises UnpicklingError, RuntimeError, ...)
    raise FormatError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
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
      raise FormatError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    v = v.detach().cpu()
    if v.is_floating_point() and v.dtype != torch.float64:
      v = v.float()
    tensors[str(k)] = v.numpy().copy()
  return tensors, {}


def read(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Read any supported weight file by extension; returns ``(tensors, metadata)``."""
  ext = _ext(path)
  if not os.path.exists(os.fspath(path)):
    raise FileNotFoundError(f"weight file not found: {path}")
  if ext in SAFETENSORS_EXTS:
    return read_safetensors(path)
  if ext in NPZ_EXTS:
    return read_npz(path)
  if ext in TORCH_EXTS:
    return read_torch(path)
  raise FormatError(f"{path}: unknown weight file extension {ext!r}; expected one of "
                    f"{SAFETENSORS_EXTS + NPZ_EXTS + TORCH_EXTS}")


def write_safetensors(path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write ``tensors`` (contiguous numpy arrays) and string ``metadata`` to ``path``."""
  from safetensors.numpy import save_file
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
  save_file(arrays, os.fspath(path), metadata={str(k): str(v) for k, v in (metadata or {}).items()})


def write_npz(path, tensors: Mapping[str, np.ndarray]) -> None:
  """Write ``tensors`` to an uncompressed ``.npz`` (no metadata)."""
  np.savez(os.fspath(path), **{k: np.asarray(v) for k, v in tensors.items()})
