"""Errors raised while reading, converting and loading weight files.

All derive from :class:`WeightsError` (a ``ValueError``), so callers can catch one type. Each
message names the offending key(s) and, for shapes, the expected and the found shape.
"""

from __future__ import annotations


class WeightsError(ValueError):
  """Base class of every fcnjax.weights error."""


class FormatError(WeightsError):
  """The file cannot be read (unknown extension, no PyTorch for a .pth, not a state dict...)."""


class LayoutError(WeightsError):
  """The file's key layout is not the one asked for, or cannot be inferred."""


class MissingKeyError(WeightsError):
  """The model needs keys that the file does not have."""

  def __init__(self, keys, layout: str):
    self.keys = sorted(keys)
    super().__init__(f"{len(self.keys)} key(s) missing from the {layout} weight file: "
                     f"{', '.join(self.keys)}")


class UnexpectedKeyError(WeightsError):
  """The file has keys that the model has no place for."""

  def __init__(self, keys, layout: str):
    self.keys = sorted(keys)
    super().__init__(f"{len(self.keys)} unexpected key(s) in the {layout} weight file (the model "
                     f"has no place for them): {', '.join(self.keys)}")


class ShapeMismatchError(WeightsError):
  """A tensor in the file does not have the shape the model needs."""

  def __init__(self, key: str, expected, found, target: str | None = None):
    self.key, self.expected, self.found = key, tuple(expected), tuple(found)
    where = f" (for fcnjax parameter {target})" if target and target != key else ""
    super().__init__(f"wrong shape for key {key!r}{where}: expected {self.expected}, "
                     f"found {self.found}")


class NumClassesError(WeightsError):
  """The file's score layers are for a different number of classes than the model's."""

  def __init__(self, key: str, file_classes: int, model_classes: int):
    self.key, self.file_classes, self.model_classes = key, file_classes, model_classes
    super().__init__(
        f"the weight file scores {file_classes} classes (key {key!r}) but the model has "
        f"{model_classes}; to fine-tune for {model_classes} classes, pass reinit_scores=True: the "
        "backbone (conv1_1 … fc7) is loaded and the score/upsampling layers keep their fresh "
        "initialisation (zeros / bilinear)")


class UpsamplingKernelError(WeightsError):
  """The file's transposed-conv kernel is not bilinear but the model's upsampling is fixed."""

  def __init__(self, key: str, max_diff: float, tol: float):
    self.key, self.max_diff = key, max_diff
    super().__init__(
        f"the upsampling kernel {key!r} is not the fixed bilinear kernel (max |difference| "
        f"{max_diff:.3g} > {tol:g}); this model computes its upsampling as fixed bilinear and "
        "would ignore it: build the model with learnable_upsampling=True to load learned kernels")
