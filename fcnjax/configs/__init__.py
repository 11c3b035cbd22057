"""Experiments as configs: each module here is one experiment, with ``get_config(preset=None)``.

A config is an :class:`ml_collections.ConfigDict` holding the whole run (model, data,
optimisation, loss, evaluation, checkpointing, output; see :mod:`fcnjax.configs.base` for every
field). ``python -m fcnjax.train --config NAME_OR_PATH[:PRESET]`` runs one; this module finds,
loads, checks and compares them:

* :func:`experiments` - the built-in experiment names and their one-line descriptions.
* :func:`load` - ``"voc_fcn8s:smoke"`` or ``"path/to/my_config.py:preset"`` -> a checked config.
* :func:`check_fields` - every field is one of :func:`~fcnjax.configs.base.base_config`'s (a
  misspelt one is an error naming the closest real ones); :func:`validate` - values in range.
* :func:`differences` - what differs between two configs (a resumed run against its checkpoint).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import math
import pathlib
import pkgutil

import ml_collections

from fcnjax.configs import base

FREE_ON_RESUME = ("data.num_workers", "data.cache", "train.log_every", "output.tensorboard",
                  "output.compile_cache", "data.on_bad_data", "data.validate", "eval.protocol",
                  "eval.final_protocol", "train.precompile", "train.compile_threads")
"""Fields that do not change what a run trains (the evaluation protocols change only how it is
measured): a resumed run may change them freely."""
OPEN_SECTIONS = ("data.builtin",)
"""Sections whose fields each experiment defines itself (not checked against the base)."""

CHOICES = {
    "data.kind": ("voc", "folder", "pets", "classes"),
    "model.pooling": ("max", "avg"),
    "data.mask_values": ("index", "binary", "trimap", "palette"),
    "data.on_bad_data": ("skip", "raise"),
    "data.validate": ("header", "full"),
    "data.exif": ("apply", "ignore"),
    "model.precision": ("fp32", "bf16"),
    "model.ops": ("auto", "cpu", "lax"),
    "optim.optimizer": ("reference", "sgd", "adamw"),
    "optim.schedule": ("poly", "cosine", "constant"),
    "loss.reduction": ("mean", "sum"),
    "eval.protocol": ("exact", "bucketed"),
    "eval.final_protocol": ("exact", "bucketed"),
}


class ConfigError(ValueError):
  """A config that cannot be run: the message names the field (or file) and the problem.

  ``field`` / ``value``: the config field and its value, where the error is about one."""

  def __init__(self, message, *, field: str | None = None, value=None):
    super().__init__(message)
    self.field, self.value = field, value


# -- finding and loading ------------------------------------------------------------------------
def experiments() -> dict[str, str]:
  """``{name: one-line description}`` of the built-in experiments (the modules of this package
  with a ``get_config``)."""
  out = {}
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if info.name == "base" or info.name.startswith("_"):
      continue
    mod = importlib.import_module(f"{__name__}.{info.name}")
    if hasattr(mod, "get_config"):
      out[info.name] = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
  return out


def split_spec(spec: str) -> tuple[str, str | None]:
  """``"NAME_OR_PATH[:PRESET]"`` -> (name or path, preset or None)."""
  head, sep, preset = spec.rpartition(":")
  if not sep or "/" in preset or preset.endswith(".py"):
    return spec, None
  return head, preset or None


def config_file(name_or_path: str) -> pathlib.Path:
  """The file of a built-in experiment ``name``, or the user's config file ``path``."""
  if name_or_path in experiments():
    spec = importlib.util.find_spec(f"{__name__}.{name_or_path}")
    return pathlib.Path(spec.origin)
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_file():
    return path
  names = list(experiments())
  close = difflib.get_close_matches(name_or_path, names, n=3)
  hint = f" (did you mean {', '.join(close)}?)" if close else ""
  raise ConfigError(f"--config {name_or_path}: no built-in experiment and no file of that "
                    f"name{hint}; built-in experiments: {', '.join(names)}")


def load_file(path, preset: str | None = None) -> ml_collections.ConfigDict:
  """Run ``get_config(preset)`` of the config file ``path`` (unchecked)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"_fcnjax_config_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except Exception as e:
    raise ConfigError(f"{path}: cannot run the config file: {type(e).__name__}: {e}") from e
  if not hasattr(mod, "get_config"):
    raise ConfigError(f"{path}: a config file must define get_config(preset=None)")
  try:
    cfg = mod.get_config(preset) if preset is not None else mod.get_config()
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ConfigError(f"{path}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict "
                      f"(start from fcnjax.configs.base.base_config()), got {type(cfg).__name__}")
  return cfg


def load(spec: str) -> ml_collections.ConfigDict:
  """``"NAME_OR_PATH[:PRESET]"`` -> the config, with its fields and values checked."""
  name, preset = split_spec(spec)
  cfg = load_file(config_file(name), preset)
  check_fields(cfg)
  validate(cfg)
  return cfg


# -- checking -----------------------------------------------------------------------------------
def flatten(cfg, prefix: str = "") -> dict:
  """``{"section.field": value}`` of a ConfigDict (or a nested dict)."""
  out = {}
  for k, v in (cfg.items() if hasattr(cfg, "items") else ()):
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      sub = flatten(v, key + ".")
      out.update(sub if sub else {key: {}})
    else:
      out[key] = v
  return out


def closest(name: str, names) -> str:
  """`` (did you mean a, b?)`` for the nearest of ``names``, or ``""``."""
  close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
  if not close:  # a wrong section with the right field name: match on the last part
    last = name.rsplit(".", 1)[-1]
    close = [n for n in names if n.rsplit(".", 1)[-1] == last][:3]
  return f" (did you mean {', '.join(close)}?)" if close else ""


def _open(key: str) -> bool:
  return any(key == s or key.startswith(s + ".") for s in OPEN_SECTIONS)


def check_fields(cfg) -> None:
  """Raise :class:`ConfigError` for a field that the base config does not have (a misspelling,
  naming the closest real fields) or for a base field the config lacks."""
  known = flatten(base.base_config())
  have = flatten(cfg)
  for key in have:
    if key not in known and not _open(key):
      raise ConfigError(f"config field {key!r} does not exist{closest(key, known)}")
  missing = [k for k in known if k not in have and not _open(k)]
  if missing:
    raise ConfigError(f"config lacks the fields {missing[:5]}: start a config from "
                      "fcnjax.configs.base.base_config() (or an experiment's get_config())")


def check_override(cfg, key: str) -> None:
  """Raise :class:`ConfigError` if ``--config.KEY`` names no field of ``cfg``."""
  fields = flatten(cfg)
  if key not in fields:
    raise ConfigError(f"--config.{key}: no such config field{closest(key, fields)}")


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


MIN_WIDTH_MULTIPLIER = 1 / 64
"""Below 1/64 the first VGG16 stage (64 channels) would have no channel left."""


def _bad(key: str, value, rule: str) -> "ConfigError":
  return ConfigError(f"{key} = {value!r}: {rule}", field=key, value=value)


def validate(cfg) -> None:
  """Raise :class:`ConfigError` naming the first field whose value cannot work (its ``field``
  and ``value`` attributes let a CLI name its own flag instead)."""
  flat = flatten(cfg)
  for key, allowed in CHOICES.items():
    if flat.get(key) not in allowed:
      raise _bad(key, flat.get(key), f"must be one of {', '.join(allowed)}")
  from fcnjax import models
  if cfg.model.name not in models.MODELS and cfg.model.name not in models.CLASSIFIERS:
    raise _bad("model.name", cfg.model.name,
               f"not a model; segmentation models: {', '.join(sorted(models.MODELS))}; "
               f"classifiers: {', '.join(sorted(models.CLASSIFIERS))}")
  classifier = cfg.model.name in models.CLASSIFIERS
  if classifier != (cfg.data.kind == "classes"):
    raise _bad("data.kind", cfg.data.kind,
               f"{cfg.model.name} is a {'classifier' if classifier else 'segmentation model'}: "
               + ("it trains on data.kind = classes (class-per-folder images)" if classifier else
                  "data.kind = classes is for the classifiers (fcn_classifier, ...)"))
  if classifier:
    for key, default in (("model.learnable_upsampling", False), ("model.batch_norm", False)):
      if flat[key] != default:
        raise _bad(key, flat[key], f"a segmentation option; {cfg.model.name} is a classifier: "
                   "leave it at its default")
  if not 0 <= cfg.model.classifier_dropout < 1:
    raise _bad("model.classifier_dropout", cfg.model.classifier_dropout, "must be in [0, 1)")
  rt = tuple(cfg.data.resize_to)
  if rt and not (len(rt) == 2 and all(isinstance(v, int) and v >= 1 for v in rt)):
    raise _bad("data.resize_to", rt, "must be () or (h, w), two positive integers")
  if rt and cfg.data.kind != "classes":
    raise _bad("data.resize_to", rt, "resizing is only offered for data.kind = classes (a "
               "segmentation label cannot be squashed without changing it)")
  if not 0 <= cfg.loss.label_smoothing < 1:
    raise _bad("loss.label_smoothing", cfg.loss.label_smoothing, "must be in [0, 1)")
  if any(not (isinstance(w, int) and w >= 1) for w in cfg.model.classifier_widths) or (
      cfg.model.classifier_widths and len(cfg.model.classifier_widths) != 5):
    raise _bad("model.classifier_widths", tuple(cfg.model.classifier_widths),
               "must be () (the tutorial's) or 5 positive integers (one per conv block)")
  if models.SPECS[cfg.model.name].family == "resnet":
    for key, default in (("model.aligned", False), ("model.batch_norm", False)):
      if flat[key] != default:
        raise _bad(key, flat[key], f"a VGG option; {cfg.model.name} is a ResNet model (no "
                   "alignment needed, BatchNorm always on): leave it at its default")
  if not (math.isfinite(cfg.loss.aux_weight) and cfg.loss.aux_weight >= 0):
    raise _bad("loss.aux_weight", cfg.loss.aux_weight, "must be a number >= 0")
  mb = str(cfg.data.max_buckets)
  if mb != "auto" and not (mb.isdigit() and int(mb) >= 1):
    raise _bad("data.max_buckets", mb, "must be a positive integer (1, 2, ...) or 'auto'")
  for key in ("data.batch_size", "data.granularity", "optim.accumulate", "train.epochs",
              "train.log_every", "eval.every_epochs", "checkpoint.save_every", "checkpoint.keep"):
    if not _positive_int(flat[key]):
      raise _bad(key, flat[key], "must be a positive integer (1, 2, ...)")
  ct = cfg.train.compile_threads
  if not (isinstance(ct, int) and not isinstance(ct, bool) and ct >= 0):
    raise _bad("train.compile_threads", ct, "must be an integer >= 0 (0: auto)")
  if not isinstance(cfg.data.cost_profile, str):
    raise _bad("data.cost_profile", cfg.data.cost_profile,
               "must be the path of a cost profile JSON, or '' for the backend's default")
  if not isinstance(cfg.train.precompile, bool):
    raise _bad("train.precompile", cfg.train.precompile, "must be true or false")
  for key in ("data.pixels_per_batch", "data.eval_batch_size", "train.steps"):
    if flat[key] is not None and not _positive_int(flat[key]):
      raise _bad(key, flat[key], "must be a positive integer (1, 2, ...) or unset")
  if not (isinstance(cfg.model.num_classes, int) and cfg.model.num_classes >= 0):
    raise _bad("model.num_classes", cfg.model.num_classes, "must be >= 1 (0 = from the dataset)")
  wm = cfg.model.width_multiplier
  if not (math.isfinite(wm) and wm >= MIN_WIDTH_MULTIPLIER):
    raise _bad("model.width_multiplier", wm,
               f"must be >= 1/64 (= {MIN_WIDTH_MULTIPLIER:g}; 1 = VGG16's widths, 1/8 = the "
               "small CPU model): below that a layer has no channels")
  lr = cfg.optim.learning_rate
  if lr is None and cfg.optim.optimizer != "reference":
    raise ConfigError("optim.learning_rate is unset: only the 'reference' optimizer has a "
                      "default (the paper's rate for the model)", field="optim.learning_rate")
  if lr is not None and not (math.isfinite(lr) and lr > 0):
    raise _bad("optim.learning_rate", lr, "must be a positive number (e.g. 1e-3)")
  for key in ("data.num_workers", "train.seed", "optim.warmup_steps"):
    if not (isinstance(flat[key], int) and flat[key] >= 0):
      raise _bad(key, flat[key], "must be an integer >= 0")
  if not 0 <= cfg.augment.color_jitter < 1:
    raise _bad("augment.color_jitter", cfg.augment.color_jitter, "must be in [0, 1)")
  sr = tuple(cfg.augment.scale_range)
  if sr and not (len(sr) == 2 and 0 < sr[0] <= sr[1]):
    raise _bad("augment.scale_range", sr, "must be () or (lo, hi) with 0 < lo <= hi")
  if not 0 < cfg.data.val_fraction < 1:
    raise _bad("data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
  if not cfg.loss.dice_weight >= 0:
    raise _bad("loss.dice_weight", cfg.loss.dice_weight, "must be >= 0")
  if any(not w >= 0 for w in cfg.loss.class_weights):
    raise _bad("loss.class_weights", tuple(cfg.loss.class_weights), "every weight must be >= 0")


def check_devices(cfg, num_devices: int, num_processes: int = 1) -> None:
  """Raise :class:`ConfigError` if a batch size is not a multiple of the data-parallel devices,
  or if an option needs a single process (``data.on_bad_data = "raise"``: a bad file is seen
  only by the process that loads it, which cannot stop the others at a common step)."""
  if num_processes > 1 and cfg.data.on_bad_data == "raise":
    raise _bad("data.on_bad_data", "raise", f"works on a single process only (this run has "
               f"{num_processes}); use skip: bad files are skipped and counted")
  for key in ("data.batch_size", "data.eval_batch_size"):
    value = flatten(cfg)[key]
    if key == "data.batch_size" and cfg.data.pixels_per_batch:
      continue
    if value is not None and value % num_devices:
      raise _bad(key, value, f"must be a multiple of the {num_devices} devices (each device "
                 "takes an equal share of a batch)")


# -- comparing and storing ----------------------------------------------------------------------
def to_dict(cfg) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return json.loads(cfg.to_json())


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Inverse of :func:`to_dict` (lists become tuples again), typed as the base config."""
  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    return tuple(x) if isinstance(x, list) else x
  d = fix(d)
  cfg = base.base_config()
  cfg.data.builtin.update(d.get("data", {}).pop("builtin", {}))
  flat = flatten(d)
  unknown = [k for k in flat if k not in flatten(cfg)]
  if unknown:
    raise ConfigError(f"stored config has fields this version does not know: {unknown[:5]}")
  cfg.update_from_flattened_dict(flat)
  return cfg


def differences(saved, wanted, *, ignore=FREE_ON_RESUME) -> list[tuple[str, object, object]]:
  """``[(field, saved value, wanted value)]`` for every field that differs (``ignore`` aside)."""
  a, b = flatten(to_dict(saved)), flatten(to_dict(wanted))
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in ignore]
