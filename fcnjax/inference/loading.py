"""WEIGHTS -> a segmentation model ready for inference, with its class names and colours.

What a user can point ``predict`` / ``export`` / :class:`~fcnjax.inference.Predictor` at:

* a training **workdir** (``WORKDIR/checkpoints``, ``WORKDIR/best``): the best checkpoint (by val
  mean IU) if there is one, else the latest; ``step=N`` picks checkpoint N (from ``best/`` or
  ``checkpoints/``). The model is rebuilt from the config the checkpoint stores; class names and
  palette come from its meta (checkpoints written before they were stored there: the VOC names
  for 21 classes, else ``0 .. C-1``, and the VOC palette).
* an fcnjax **weights file** (``.safetensors`` written by :func:`fcnjax.weights.save` or
  ``python -m fcnjax.weights save WORKDIR OUT``; a segmenter's or a classifier's), or a
  **pytorch-fcn** checkpoint (``fcn8s_from_caffe.pth`` ...), through :func:`fcnjax.weights.load`.
  Optional metadata keys ``class_names`` / ``palette`` (JSON lists) name the classes and colours.

Every problem raises :class:`ModelLoadError` (a ``ValueError``) whose message starts with the
path and says what is wrong; weight-file problems are :class:`fcnjax.weights.WeightsError` s
(already ``"PATH: ..."``) and pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.data.palette import VOC_CLASSES, VOC_PALETTE

WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt")


class ModelLoadError(ValueError):
  """WEIGHTS cannot be turned into a segmentation model (the message names the path)."""


@dataclasses.dataclass
class LoadedModel:
  """A segmentation model and what is needed to read its output.

  Attributes:
    model: the Flax NNX model, in eval mode: (N, H, W, 3) preprocessed float32 ->
      (N, H, W, num_classes) logits.
    class_names: one name per class (index = class id).
    palette: (256, 3) uint8 colours by class id (255 = void/ignore).
    preprocessing: the input convention of the weights (:mod:`fcnjax.preprocessing`).
    description: what was loaded, one line (for logs and the export's metadata).
    info: the model description (:func:`fcnjax.weights.describe`), for metadata.
  """

  model: object
  class_names: tuple
  palette: np.ndarray
  preprocessing: preprocessing_lib.Preprocessing
  description: str
  info: dict

  @property
  def num_classes(self) -> int:
    return int(self.model.num_classes)

  @property
  def task(self) -> str:
    """``"segmentation"`` ((N, H, W, C) logits) or ``"classification"`` (an FCN classifier of
    :mod:`fcnjax.models.classifier`: (N, C) logits)."""
    return getattr(self.model, "task", "segmentation")


def default_class_names(num_classes: int) -> tuple:
  """VOC's names for 21 classes, else ``("0", ..., str(C - 1))``."""
  return tuple(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else tuple(
      str(i) for i in range(num_classes))


def _palette(value, where: str) -> np.ndarray:
  if value is None:
    return np.asarray(VOC_PALETTE, np.uint8)
  arr = np.asarray(value)
  if arr.ndim != 2 or arr.shape[1] != 3 or not 1 <= len(arr) <= 256 or arr.min() < 0 \
      or arr.max() > 255:
    raise ModelLoadError(f"{where}: palette must be up to 256 RGB triples 0..255, got shape "
                         f"{arr.shape}")
  full = np.array(VOC_PALETTE, np.uint8)
  full[:len(arr)] = arr
  return full


def _class_names(value, num_classes: int, where: str) -> tuple:
  if value is None:
    return default_class_names(num_classes)
  names = tuple(str(n) for n in value)
  if len(names) != num_classes:
    raise ModelLoadError(f"{where}: {len(names)} class names for a {num_classes}-class model")
  return names


def is_workdir(path) -> bool:
  """Whether ``path`` is a training workdir (has ``checkpoints/`` or ``best/``)."""
  p = pathlib.Path(path)
  return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "best").is_dir())


def _numbered(d: pathlib.Path) -> list:
  return sorted(int(c.name) for c in d.iterdir() if c.is_dir() and c.name.isdigit()) \
      if d.is_dir() else []


def _run_preprocessing(meta: dict, workdir) -> preprocessing_lib.Preprocessing:
  """The input convention the run trained with: stored in the meta; checkpoints that do not
  store it come from runs whose loaders always used Caffe's."""
  from fcnjax.weights.loading import resolve_preprocessing
  if not meta.get("preprocessing"):
    return preprocessing_lib.CAFFE
  try:
    return resolve_preprocessing(meta["preprocessing"])
  except ValueError:
    raise ModelLoadError(f"{workdir}: unknown preprocessing {meta['preprocessing']!r} in the "
                         "checkpoint's meta") from None


def load_workdir(workdir, step: int | None = None) -> LoadedModel:
  """The model of a training workdir's best checkpoint (else latest; ``step`` to choose)."""
  from fcnjax import configs as configs_lib
  from fcnjax.train import checkpoint as ckpt_lib
  from fcnjax.train import loop
  from fcnjax.train import step as step_lib
  from flax import nnx

  workdir = pathlib.Path(workdir)
  best, last = _numbered(workdir / "best"), _numbered(workdir / "checkpoints")
  if step is None:
    use_best, chosen = (True, best[-1]) if best else (False, last[-1] if last else None)
  elif step in best or step in last:
    use_best, chosen = step in best, step
  else:
    raise ModelLoadError(f"{workdir}: no checkpoint {step} (best: {best or 'none'}; "
                         f"checkpoints: {last or 'none'})")
  if chosen is None:
    raise ModelLoadError(f"{workdir}: no checkpoint in {workdir / 'checkpoints'} or "
                         f"{workdir / 'best'}: train first")
  ckpt = ckpt_lib.Checkpointer(workdir)
  try:
    try:
      meta = ckpt.read_meta(chosen, best=use_best)
    except ckpt_lib.CheckpointDamaged as e:
      raise ModelLoadError(f"{workdir}: {e}") from None
    if not meta.get("config"):
      raise ModelLoadError(f"{workdir}: checkpoint {chosen} stores no config (written by an "
                           "older fcnjax): cannot rebuild its model")
    config = configs_lib.from_dict(meta["config"])
    model = loop.build_model(config)
    tx = loop.build_optimizer(config, total_steps=max(1, int(meta.get("total_steps", 1))))
    graphdef, like = step_lib.init_state(model, tx)
    try:
      state, _ = ckpt.restore(like, model_description=loop.model_description(config),
                              step=chosen, best=use_best)
    except (ckpt_lib.CheckpointDamaged, ckpt_lib.CheckpointMismatch) as e:
      raise ModelLoadError(f"{workdir}: {e}") from None
  finally:
    ckpt.close()
  model = nnx.merge(graphdef, state.params, state.rest)
  model.eval()
  model.preprocessing = _run_preprocessing(meta, workdir)
  where = f"{workdir}"
  names = _class_names(meta.get("class_names"), int(model.num_classes), where)
  palette = _palette(meta.get("palette"), where)
  kind = "best" if use_best else "checkpoint"
  if getattr(model, "task", "") == "classification":
    info = {"model": config.model.name, "num_classes": str(config.model.num_classes),
            "width_multiplier": repr(float(config.model.width_multiplier)),
            "pooling": config.model.pooling, "task": "classification",
            "preprocessing": model.preprocessing.name}
    return LoadedModel(model, names, palette, model.preprocessing,
                       f"{workdir} ({kind} step {chosen}, {config.model.name}, "
                       f"width x{config.model.width_multiplier:g})", info)
  from fcnjax import weights
  return LoadedModel(model, names, palette, model.preprocessing,
                     f"{workdir} ({kind} step {chosen}, {config.model.name}, "
                     f"{_geometry(weights.describe(model))}"
                     f"width x{config.model.width_multiplier:g})",
                     weights.describe(model))


def load_weights_file(path) -> LoadedModel:
  """The model of an fcnjax ``.safetensors`` (a segmenter's or a classifier's) or a pytorch-fcn
  checkpoint."""
  from fcnjax import weights
  from fcnjax.weights import layouts
  from fcnjax.weights.loading import _source
  path = pathlib.Path(path)
  model = weights.load(path)
  classifier = getattr(model, "task", "") == "classification"
  if not classifier and not layouts.is_fcn(model):
    raise ModelLoadError(f"{path}: a bare backbone (VGG16 / ResNet) without score layers, "
                         "not a segmentation model: train a segmenter from it first (--init)")
  model.eval()
  _, metadata, _ = _source(path)
  names = palette = None
  try:
    names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    palette = json.loads(metadata["palette"]) if "palette" in metadata else None
  except ValueError as e:
    raise ModelLoadError(f"{path}: metadata class_names / palette is not JSON ({e})") from None
  info = weights.describe(model)
  shape = (_classifier_width(info) if classifier
           else f"{_geometry(info)}width x{float(info['width_multiplier']):g}")
  return LoadedModel(model, _class_names(names, int(model.num_classes), str(path)),
                     _palette(palette, str(path)), model.preprocessing,
                     f"{path} ({info['model']}, {shape})", info)


def _classifier_width(info) -> str:
  widths = json.loads(info.get("classifier_options", "{}")).get("widths")
  if widths:
    return "widths " + "-".join(map(str, widths))
  return f"width x{float(info['width_multiplier']):g}"


def _geometry(info) -> str:
  """``"aligned, "`` / ``"exact, "`` for a VGG model's metadata; ``""`` for a ResNet model."""
  if "aligned" not in info:
    return ""
  return "aligned, " if info["aligned"] == "true" else "exact, "


def load_model(weights_path, *, step: int | None = None) -> LoadedModel:
  """A workdir or a weights file -> :class:`LoadedModel` (see the module docstring)."""
  p = pathlib.Path(weights_path).expanduser()
  if not p.exists():
    raise ModelLoadError(f"{p}: no such file or directory (give a training workdir, an fcnjax "
                         ".safetensors or a pytorch-fcn .pth)")
  if p.is_dir():
    if not is_workdir(p):
      raise ModelLoadError(f"{p}: a folder without checkpoints/ or best/: not a training "
                           "workdir")
    return load_workdir(p, step)
  if step is not None:
    raise ModelLoadError(f"{p}: --step only applies to a training workdir")
  return load_weights_file(p)
