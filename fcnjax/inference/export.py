"""A loaded model -> a serialized, shape-polymorphic ``jax.export`` artifact (reading it back:
:mod:`fcnjax.serving.artifact`, re-exported here).

:func:`export_model` writes two files:

* ``OUT``: the bytes of ``jax.export.export(jax.jit(fn), platforms=...)(spec).serialize()``,
  ``fn`` mapping **uint8 RGB images (N, H, W, 3)** to float32 logits for any N >= 1 and H, W at
  least the model's minimum input size (symbolic ``n, h, w``): **(N, H, W, C)** for a
  segmenter, **(N, C)** for a classifier (a model with ``task == "classification"``, e.g.
  :class:`fcnjax.models.FCNClassifier`). The weights' preprocessing (Caffe BGR minus mean, or
  torchvision RGB / 255 mean/std) runs inside ``fn``; the parameters are baked in as constants.
  A segmenter is exported in the ``ops="lax"`` form of the loaded one (XLA's native ops, no
  custom VJPs); a classifier as it is, in eval mode. By default it is lowered for
  ``("cpu", "cuda")``, so the file runs on either; where lowering for CUDA fails, for the
  current backend only (the JSON says which).
* ``OUT.json``: what a consumer needs beside it: the task, class names, palette, the input
  convention, the minimum input size, the model's translation period and input multiple,
  versions (:func:`export_model`'s doc).

Reading an artifact needs nothing but jax and numpy::

    exp = jax.export.deserialize(open(OUT, "rb").read())
    logits = exp.call(images_uint8)            # (N, H, W, 3) uint8 -> (N, H, W, C) float32

or, with the metadata, :func:`load_exported` -> :class:`ExportedModel`. Problems raise
:class:`ExportError` (a ``ValueError``) whose message starts with the path.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.serving.artifact import (CLASSIFICATION, FORMAT, FORMAT_VERSION,  # noqa: F401
                                     SEGMENTATION, ExportedModel, ExportError, is_exported,
                                     load_exported)
from fcnjax.serving.artifact import one_line as _one_line

DEFAULT_PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
SHAPE_CONSTRAINTS = ("h >= 1", "w >= 1")
"""The symbolic sizes' constraints of a segmenter (any size); a classifier's are its minimum."""
#: Input sizes (N, H, W) at which :func:`export_model` checks the artifact against the model
#: (each side raised to the model's minimum input size).
CHECK_SIZES = ((1, 64, 64), (2, 37, 53))
#: Largest difference between the jnp and numpy preprocessing that :func:`export_model` accepts.
PREPROCESSING_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Preprocessing in jnp


def caffe_preprocess_jnp(rgb_uint8: jax.Array) -> jax.Array:
  """jnp :func:`fcnjax.preprocessing.caffe_preprocess`: RGB uint8 (..., 3) -> float32 BGR - mean."""
  x = rgb_uint8.astype(jnp.float32)[..., ::-1]
  return x - jnp.asarray(preprocessing_lib.CAFFE_MEAN_BGR)


def keras_tf_preprocess_jnp(rgb_uint8: jax.Array) -> jax.Array:
  """jnp :func:`fcnjax.preprocessing.keras_tf_preprocess`: RGB uint8 (..., 3) -> float32
  ``x / 127.5 - 1``."""
  return rgb_uint8.astype(jnp.float32) / jnp.float32(127.5) - jnp.float32(1.0)


def torchvision_preprocess_jnp(rgb_uint8: jax.Array) -> jax.Array:
  """jnp :func:`fcnjax.preprocessing.torchvision_preprocess`: RGB uint8 (..., 3) -> float32
  ``(x / 255 - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB``."""
  x = rgb_uint8.astype(jnp.float32) / jnp.float32(255.0)
  return ((x - jnp.asarray(preprocessing_lib.IMAGENET_MEAN_RGB))
          / jnp.asarray(preprocessing_lib.IMAGENET_STD_RGB))


def _as_list(a) -> list:
  return [float(v) for v in np.asarray(a, np.float64)]


#: preprocessing name -> (jnp function, its description in the JSON)
_JNP_PREPROCESSING = {
    preprocessing_lib.CAFFE.name: (caffe_preprocess_jnp, {
        "channel_order": "BGR", "scale": 1.0,
        "mean": _as_list(preprocessing_lib.CAFFE_MEAN_BGR), "std": [1.0, 1.0, 1.0],
        "formula": "float32(rgb)[..., ::-1] - mean (mean in BGR order)"}),
    preprocessing_lib.TORCHVISION.name: (torchvision_preprocess_jnp, {
        "channel_order": "RGB", "scale": 1.0 / 255.0,
        "mean": _as_list(preprocessing_lib.IMAGENET_MEAN_RGB),
        "std": _as_list(preprocessing_lib.IMAGENET_STD_RGB),
        "formula": "(float32(rgb) / 255 - mean) / std (RGB order)"}),
    preprocessing_lib.KERAS_TF.name: (keras_tf_preprocess_jnp, {
        "channel_order": "RGB", "scale": 1.0 / 127.5, "mean": [127.5, 127.5, 127.5],
        "std": [127.5, 127.5, 127.5], "formula": "float32(rgb) / 127.5 - 1 (RGB order)"}),
}


def jnp_preprocessing(pre: preprocessing_lib.Preprocessing):
  """The jnp function of a named convention; ``ValueError`` for an unknown one."""
  if pre.name not in _JNP_PREPROCESSING:
    raise ValueError(f"no jnp form of the preprocessing {pre.name!r} (known: "
                     f"{', '.join(_JNP_PREPROCESSING)})")
  return _JNP_PREPROCESSING[pre.name][0]


def preprocessing_mismatch(pre: preprocessing_lib.Preprocessing) -> float:
  """Max |jnp - numpy| of ``pre`` over every uint8 value in every channel (0 if identical)."""
  v = np.arange(256, dtype=np.uint8)
  rgb = np.stack([v, v[::-1], np.roll(v, 85)], axis=-1).reshape(1, 16, 16, 3)
  got = np.asarray(jax.jit(jnp_preprocessing(pre))(rgb))
  return float(np.abs(got - np.asarray(pre.fn(rgb), np.float32)).max())


# ---------------------------------------------------------------------------------------------
# The model in its exportable form


def _splat_kernel_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                       dimension_numbers=None, feature_group_count=1, precision=None,
                       **kwargs):
  """``lax.conv_general_dilated`` for a kernel whose elements are all equal (``c``).

  Such a convolution is ``c * (window sum of the channel sum of lhs)``, broadcast to the output
  channels; this computes it that way (same numbers to float rounding). Why: XLA:CPU (jaxlib
  0.10.2) rewrites an all-equal *constant* kernel as a broadcast scalar, and its YNNPACK fusions
  then compute such convolutions wrongly (garbage or NaN) — e.g. an untrained, zero score layer
  of an exact FCN at 64x64. Only NHWC / HWIO, ungrouped, undilated-input convolutions are
  rewritten; anything else goes to ``lax.conv_general_dilated`` unchanged.
  """
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if (lhs.ndim != 4 or dn != nhwc or feature_group_count != 1
      or (lhs_dilation is not None and tuple(lhs_dilation) != (1, 1))
      or kwargs.get("preferred_element_type") is not None):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)
  kh, kw, _, cout = rhs.shape
  rhs_dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1, 1)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), tuple(window_strides), padding)
  s = jnp.sum(lhs, axis=-1, keepdims=True)
  r = jax.lax.reduce_window(s, np.array(0, s.dtype), jax.lax.add, (1, kh, kw, 1),
                            (1, *window_strides, 1), ((0, 0), *padding, (0, 0)),
                            window_dilation=(1, *rhs_dilation, 1))
  c = rhs.reshape(-1)[0].astype(r.dtype)
  return jnp.broadcast_to(r * c, (*r.shape[:3], cout))


def _is_splat(kernel) -> bool:
  k = np.asarray(kernel)
  return k.size > 1 and bool(np.all(k == k.reshape(-1)[0]))


def task_of(loaded) -> str:
  """``loaded.task``, else the model's ``task`` attribute, else ``"segmentation"``."""
  return getattr(loaded, "task", None) or getattr(loaded.model, "task", SEGMENTATION)


def _with_splat_convs(model):
  """Route the convolutions of ``model`` whose kernel is all-equal through
  :func:`_splat_kernel_conv` (in place); return ``model``."""
  from flax import nnx
  for _, mod in nnx.iter_modules(model):
    if isinstance(mod, nnx.Conv) and _is_splat(mod.kernel[...]):
      mod.conv_general_dilated = _splat_kernel_conv
  return model


def lax_model(loaded):
  """The exportable form of ``loaded.model`` with its state, in eval mode.

  A copy of the model when none of its layers uses the CPU convolution (``ops == "cpu"``):
  classifiers, the d2l FCN, torchvision's FCN-ResNets. Otherwise the ``ops="lax"`` form,
  rebuilt with :func:`fcnjax.models.build_model` from ``loaded.info`` (plus a VGG backbone's
  batch-norm, and the dtype, which the info does not record) and given the model's state.
  Convolutions with an all-equal kernel use :func:`_splat_kernel_conv`. ``ExportError`` if the
  state does not fit.
  """
  from flax import nnx

  src, info = loaded.model, loaded.info
  if task_of(loaded) == CLASSIFICATION or all(
      getattr(mod, "ops", "lax") == "lax" for _, mod in nnx.iter_modules(src)):
    model = nnx.clone(src)
  else:
    model = _rebuilt_as_lax(src, info)
  model.eval()
  model.preprocessing = loaded.preprocessing
  return _with_splat_convs(model)


def _rebuilt_as_lax(src, info):
  """``src`` rebuilt with ``ops="lax"`` from ``info`` (the structure only: no random init), with
  ``src``'s state."""
  from flax import nnx
  from fcnjax.models import build_model
  try:
    options = dict(width_multiplier=float(info["width_multiplier"]),
                   learnable_upsampling=info.get("learnable_upsampling") == "true",
                   dtype=_compute_dtype(src), ops="lax", seed=0)
    bb = src.backbone
    if hasattr(bb, "blocks"):  # VGG16: its geometry options and batch-norm
      options.update(aligned=info["aligned"] == "true", pool=info.get("pool", "ceil"),
                     batch_norm=bb.blocks[0].norms is not None)
    abstract = nnx.eval_shape(lambda: build_model(info["model"], int(info["num_classes"]),
                                                  **options))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(src))
  except (KeyError, ValueError, TypeError, AttributeError) as e:
    raise ExportError(f"cannot rebuild the model as ops='lax' from {info}: {e}") from e


def min_input_size(model) -> tuple:
  """(h, w): the smallest input ``model`` accepts, from its layers' geometry (``size_ops`` of
  the model or its backbone, see :func:`fcnjax.models.min_input_size`); (1, 1) for a model
  without them."""
  ops = getattr(model, "size_ops", None)
  if ops is None:
    ops = getattr(getattr(model, "backbone", None), "size_ops", None)
  if ops is None:
    return 1, 1
  from fcnjax.models.geometry import min_input_length
  n = int(min_input_length(ops))
  return n, n


def _logits_fn(model, pre_fn):
  """``fn(images)``: (N, H, W, 3) uint8 RGB -> float32 logits ((N, H, W, C) or (N, C)),
  params constant."""
  def fn(images):
    return model(pre_fn(images)).astype(jnp.float32)
  return fn


def _constraints(min_size) -> tuple:
  mh, mw = min_size
  return (f"h >= {int(mh)}", f"w >= {int(mw)}")


def _export(fn, platforms, min_size=(1, 1)):
  spec = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape("n, h, w, 3", constraints=_constraints(min_size)), jnp.uint8)
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)


def _compute_dtype(model):
  """The dtype of the model's first convolution (``None``: float32)."""
  from flax import nnx
  for _, mod in nnx.iter_modules(model):
    if isinstance(mod, nnx.Conv):
      return mod.dtype
  return None


def check_sizes(min_size=(1, 1)) -> tuple:
  """:data:`CHECK_SIZES` with each side raised to ``min_size``."""
  mh, mw = min_size
  return tuple((n, max(h, mh), max(w, mw)) for n, h, w in CHECK_SIZES)


def _check(exported, loaded, where, min_size=(1, 1)) -> dict:
  """Run the artifact on this backend at :func:`check_sizes`; compare with ``loaded.model``
  (outputs of any rank)."""
  rng = np.random.default_rng(0)
  worst, scale = 0.0, 0.0
  from flax import nnx
  reference = nnx.jit(lambda model, x: model(x))  # one program per size (eagerly: one per op)
  sizes = check_sizes(min_size)
  for n, h, w in sizes:
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    got = np.asarray(exported.call(images))
    want = np.asarray(reference(loaded.model, jnp.asarray(loaded.preprocessing.fn(images))),
                      np.float32)
    if got.shape != want.shape:
      raise ExportError(f"{where}: the artifact gives shape {got.shape} for {images.shape}, the "
                        f"model {want.shape}")
    worst = max(worst, float(np.abs(got - want).max()))
    scale = max(scale, float(np.abs(want).max()))
  low = _compute_dtype(loaded.model) not in (None, jnp.float32)
  tol = (2e-2 if low else 1e-4) * max(scale, 1.0)
  if not worst <= tol:
    raise ExportError(f"{where}: the exported function differs from the model by {worst:.3g} "
                      f"(max |logit| {scale:.3g}, tolerance {tol:.3g})")
  return {"backend": jax.default_backend(), "sizes": [list(s) for s in sizes],
          "max_abs_diff": worst,
          "max_abs_logit": scale}


def _translation_period(backbone):
  """The total stride of ``backbone``'s final stage (``None`` without coordinate maps)."""
  maps = getattr(backbone, "coord_maps", None)
  stage = getattr(backbone, "final_stage", None)
  if not maps or stage not in maps:
    return None
  return int(round(1 / maps[stage].scale))


def _dumps(meta: dict) -> str:
  """JSON with one top-level key a line (each value compact: the palette stays 1 line)."""
  items = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items()]
  return "{\n" + ",\n".join(items) + "\n}\n"


def _write(path: pathlib.Path, data: bytes) -> None:
  """Write ``data`` to ``path`` via a temporary file and a rename (no half-written file)."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def export_model(loaded, out_path, *, platforms=None) -> dict:
  """Write the artifact of ``loaded`` (a :class:`~fcnjax.inference.LoadedModel`) to ``out_path``
  and its metadata to ``out_path + ".json"``; return the metadata.

  Args:
    loaded: the model to export.
    out_path: the artifact's path (overwritten if it exists; the CLI refuses that).
    platforms: platforms to lower for (e.g. ``("cpu",)``); ``None``: ``("cpu", "cuda")``, else
      (lowering for CUDA failed) the current backend only.

  The metadata: ``format`` (``"fcnjax-export"``), ``format_version`` (1), ``task``
  (``"segmentation"`` | ``"classification"``), ``input`` / ``output`` (dtype, layout, shape
  with ``"N"``, ``"H"``, ``"W"``: ``["N", "H", "W", C]`` for a segmenter, ``["N", C]`` for a
  classifier), ``min_input_size`` ([h, w]), ``num_classes``, ``class_names``,
  ``palette`` (256 RGB triples), ``preprocessing`` (``name``, ``channel_order``, ``scale``,
  ``mean``, ``std``, ``formula``; applied inside the artifact), ``pad_value_rgb``, ``model``
  (``info`` and ``description``), ``translation_period`` (the total stride: shifting the input
  by a multiple of it shifts the logits alike; ``None`` for a classifier without coordinate
  maps), ``input_multiple``, ``bucket_padding_safe`` (false for a model whose logits depend on
  the whole input size, torchvision's FCN-ResNet: :class:`~fcnjax.inference.Predictor` then runs
  images unpadded), ``shape_constraints``,
  ``platforms`` (lowered for), ``platforms_requested``, ``platforms_note``, ``check`` (the
  comparison with the model on this backend, or ``None`` where the artifact is not lowered
  for it), ``fcnjax_version``, ``jax_version``, ``created`` (ISO date), ``export_seconds``.

  Raises :class:`ExportError` (``"OUT: ..."``) when the model cannot be traced with symbolic
  shapes, lowered for the platforms, or its artifact disagrees with the model; ``OSError``
  when a file cannot be written.
  """
  import fcnjax

  t0 = time.perf_counter()
  out = pathlib.Path(out_path)
  where = str(out)
  pre = loaded.preprocessing
  if pre.name not in _JNP_PREPROCESSING:
    raise ExportError(f"{where}: no jnp form of the preprocessing {pre.name!r}")
  mismatch = preprocessing_mismatch(pre)
  if not mismatch <= PREPROCESSING_ATOL:
    raise ExportError(f"{where}: the jnp preprocessing {pre.name!r} differs from numpy's by "
                      f"{mismatch:.3g}")
  try:
    model = lax_model(loaded)
  except ExportError as e:
    raise ExportError(f"{where}: {e}") from e
  fn = _logits_fn(model, jnp_preprocessing(pre))
  task = task_of(loaded)
  min_size = min_input_size(model) if task == CLASSIFICATION else (1, 1)

  requested = tuple(platforms) if platforms else None
  note = "as requested"
  try:
    if requested is not None:
      exported = _export(fn, requested, min_size)
    else:
      try:
        exported = _export(fn, DEFAULT_PLATFORMS, min_size)
        note = "multi-platform lowering (cpu and cuda)"
      except Exception as e:  # noqa: BLE001 -- retried for this backend alone, below
        backend = jax.default_backend()
        exported = _export(fn, (backend,), min_size)  # if this fails too, the problem is not cuda's
        note = f"lowering for cuda failed here ({_one_line(e)}): {backend} only"
  except Exception as e:  # noqa: BLE001 -- tracing / lowering errors of any kind
    if type(e).__name__ == "InconclusiveDimensionOperation":
      raise ExportError(f"{where}: {loaded.description} cannot be traced with symbolic input "
                        f"sizes (a shape check it makes is undecidable for all N, H, W): "
                        f"{_one_line(e)}") from e
    raise ExportError(f"{where}: cannot export {loaded.description}: "
                      f"{type(e).__name__}: {_one_line(e)}") from e
  try:
    data = exported.serialize()
  except ImportError as e:  # jax's serialization needs the flatbuffers package
    raise ExportError(f"{where}: cannot serialize: {_one_line(e)}") from e

  check = None
  if jax.default_backend() in exported.platforms:
    check = _check(jax.export.deserialize(data), loaded, where, min_size)

  bb = getattr(loaded.model, "backbone", None)
  num_classes = int(loaded.num_classes)
  if task == CLASSIFICATION:
    output = {"dtype": "float32", "layout": "NC logits", "kind": "logits",
              "shape": ["N", num_classes]}
  else:
    output = {"dtype": "float32", "layout": "NHWC logits", "kind": "logits",
              "shape": ["N", "H", "W", num_classes]}
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
      "input": {"dtype": "uint8", "layout": "NHWC RGB", "shape": ["N", "H", "W", 3]},
      "output": output,
      "min_input_size": [int(v) for v in min_size],
      "num_classes": num_classes,
      "class_names": [str(n) for n in loaded.class_names],
      "palette": np.asarray(loaded.palette, np.uint8).astype(int).tolist(),
      "preprocessing": {"name": pre.name, **_JNP_PREPROCESSING[pre.name][1],
                        "applied_inside": True},
      "pad_value_rgb": [int(v) for v in pre.pad_value_rgb],
      "model": {"info": dict(loaded.info), "description": loaded.description},
      "translation_period": _translation_period(bb),
      "input_multiple": int(getattr(bb, "input_multiple", 1)),
      "bucket_padding_safe": not getattr(loaded.model, "resizes_to_input_size", False),
      "shape_constraints": f"N >= 1, H >= {min_size[0]}, W >= {min_size[1]}",
      "platforms": list(exported.platforms),
      "platforms_requested": list(requested) if requested else list(DEFAULT_PLATFORMS),
      "platforms_note": note,
      "check": check,
      "fcnjax_version": fcnjax.__version__,
      "jax_version": jax.__version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  meta["export_seconds"] = round(time.perf_counter() - t0, 3)
  _write(out, data)
  _write(pathlib.Path(f"{out}.json"), _dumps(meta).encode())
  return meta
