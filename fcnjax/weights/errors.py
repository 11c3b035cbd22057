"""Errors raised while reading, converting and loading weight files.

Contract: every problem with a weight file — missing, unreadable (empty, truncated, not the
format its extension says), missing or malformed keys, tensors of the wrong shape, rank or dtype,
malformed fcnjax metadata, the wrong class count, or a geometry change — is raised as a
:class:`WeightsError` (a ``ValueError``), never as a raw ``KeyError`` / ``OSError`` / numpy /
safetensors / zipfile exception, so callers (the CLIs) catch one type and print one line.

When the weights come from a file, the message starts with ``"PATH: "`` and the error's ``path``
attribute is the file (``None`` for in-memory mappings). Where one key is at fault its name is in
the message and in the ``key`` attribute (``MissingKeyError`` / ``UnexpectedKeyError`` list all
of theirs in ``keys``). Shape errors give the expected and the found shape.
"""

from __future__ import annotations

import contextlib
import errno
import os


def _path_str(path) -> str | None:
  if path is None:
    return None
  try:
    return os.fspath(path)
  except TypeError:
    return str(path)


class WeightsError(ValueError):
  """Base class of every fcnjax.weights error.

  Attributes:
    path: the weight file the error is about (``None``: in-memory weights or not known).
    key: the file key at fault, where there is exactly one (else ``None``).
  """

  path: str | None = None
  key: str | None = None

  def with_path(self, path) -> "WeightsError":
    """Record ``path`` and prefix the message with ``"PATH: "`` unless it already starts so.

    Returns ``self`` (for ``raise err.with_path(p)``); ``path=None`` changes nothing.
    """
    p = _path_str(path)
    if p is None:
      return self
    if self.path is None:
      self.path = p
    msg = str(self)
    if not msg.startswith(f"{p}:"):
      self.args = (f"{p}: {msg}",)
    return self


@contextlib.contextmanager
def about_file(path):
  """Context in which every :class:`WeightsError` raised gets ``path`` (see ``with_path``)."""
  try:
    yield
  except WeightsError as e:
    e.with_path(path)
    raise


class FormatError(WeightsError):
  """The file cannot be read or written as weights: unknown extension, empty, truncated or not in
  the format its extension says, a ``.pth`` without PyTorch or holding more than tensors, or
  fcnjax metadata with a malformed value (``key`` is then ``"metadata.NAME"``)."""

  def __init__(self, message: str, *, key: str | None = None):
    super().__init__(message)
    self.key = key


class WeightsFileNotFound(WeightsError, FileNotFoundError):
  """The weight file does not exist. Also a ``FileNotFoundError``, so ``except FileNotFoundError``
  keeps working. Message: ``"PATH: weight file not found"``."""

  def __init__(self, path):
    super().__init__(f"{_path_str(path)}: weight file not found")
    self.path = _path_str(path)
    self.errno, self.strerror, self.filename = errno.ENOENT, "weight file not found", self.path

  def __str__(self):  # the message, not OSError's "[Errno 2] ...: 'PATH'" formatting
    return str(self.args[0]) if self.args else ""


class LayoutError(WeightsError):
  """The file's key layout is not the one asked for, or cannot be inferred."""


LISTED_KEYS = 12
"""How many keys an error message names before it says how many more there are."""


def _listed(keys) -> str:
  """``"K1, K2, ..."``: the first :data:`LISTED_KEYS` keys, then ``"... and N more"``."""
  more = len(keys) - LISTED_KEYS
  return ", ".join(keys[:LISTED_KEYS]) + (f", ... and {more} more" if more > 0 else "")


class MissingKeyError(WeightsError):
  """The model (or building the model from the file) needs keys that the file does not have.

  Message: ``"N key(s) missing from the LAYOUT weight file: K1, K2[ (PURPOSE)]"``.
  """

  def __init__(self, keys, layout: str, *, purpose: str | None = None):
    self.keys = sorted(keys)
    self.key = self.keys[0] if len(self.keys) == 1 else None
    why = f" ({purpose})" if purpose else ""
    super().__init__(f"{len(self.keys)} key(s) missing from the {layout} weight file: "
                     f"{_listed(self.keys)}{why}")


class UnexpectedKeyError(WeightsError):
  """The file has keys that the model has no place for."""

  def __init__(self, keys, layout: str):
    self.keys = sorted(keys)
    self.key = self.keys[0] if len(self.keys) == 1 else None
    super().__init__(f"{len(self.keys)} unexpected key(s) in the {layout} weight file (the model "
                     f"has no place for them): {_listed(self.keys)}")


class ShapeMismatchError(WeightsError):
  """A tensor in the file does not have the shape (or rank) the model needs.

  ``expected`` is a shape tuple, or a description such as ``"a 4-D conv weight (out, in, kh,
  kw)"`` where only the rank is known.
  """

  def __init__(self, key: str, expected, found, target: str | None = None):
    self.key, self.found = key, tuple(found)
    self.expected = expected if isinstance(expected, str) else tuple(expected)
    where = f" (for fcnjax parameter {target})" if target and target != key else ""
    super().__init__(f"wrong shape for key {key!r}{where}: expected {self.expected}, "
                     f"found {self.found}")


class DTypeError(WeightsError):
  """A tensor in the file is not floating point (e.g. integer, boolean, complex or object)."""

  def __init__(self, key: str, dtype, target: str | None = None):
    self.key, self.dtype = key, str(dtype)
    where = f" (for fcnjax parameter {target})" if target and target != key else ""
    super().__init__(f"wrong dtype for key {key!r}{where}: expected a floating-point tensor, "
                     f"found {self.dtype}")


class NumClassesError(WeightsError):
  """The file's score layers are for a different number of classes than the model's."""

  def __init__(self, key: str, file_classes: int, model_classes: int):
    self.key, self.file_classes, self.model_classes = key, file_classes, model_classes
    super().__init__(
        f"the weight file scores {file_classes} classes (key {key!r}) but the model has "
        f"{model_classes}; to fine-tune for {model_classes} classes, pass --reinit-scores "
        "(reinit_scores=True in Python): the backbone (conv1_1 … fc7) is loaded and the "
        "score/upsampling layers keep their fresh initialisation (zeros / bilinear)")


class UpsamplingKernelError(WeightsError):
  """The file's transposed-conv kernel is not bilinear but the model's upsampling is fixed."""

  def __init__(self, key: str, max_diff: float, tol: float):
    self.key, self.max_diff = key, max_diff
    super().__init__(
        f"the upsampling kernel {key!r} is not the fixed bilinear kernel (max |difference| "
        f"{max_diff:.3g} > {tol:g}); this model computes its upsampling as fixed bilinear and "
        "would ignore it: build the model with learnable_upsampling=True to load learned kernels")


class GeometryError(WeightsError):
  """Trained FCN weights of one geometry (exact pad-100, or aligned) into a model of the other.

  The two variants compute different features from the same weights (conv1_1's padding, fc6's
  padding and the crops differ), so loading across them is refused unless asked for with
  ``allow_geometry_change=True`` (``--allow-geometry-change``). ``file_aligned`` is the file's
  geometry. ImageNet VGG16 backbones (no trained score layers) are never refused.
  """

  def __init__(self, path, file_aligned: bool):
    self.path = _path_str(path)
    self.file_aligned = bool(file_aligned)
    prefix = f"{self.path}: " if self.path is not None else ""
    if file_aligned:
      trained, model = "the aligned (no pad-100) geometry", "exact"
      fix = "aligned variant (--aligned)"
    else:
      trained, model = "the exact (pad-100) geometry", "aligned"
      fix = "exact variant (--no-aligned)"
    super().__init__(
        f"{prefix}these weights were trained with {trained}; the {model} model computes "
        "different features from them (README 'Exact vs aligned'): train/evaluate the "
        f"{fix}, or pass --allow-geometry-change (allow_geometry_change=True) to load them "
        "anyway")
