"""The shared defaults of every experiment: one :class:`ml_collections.ConfigDict` per run.

Every experiment config (``fcnjax/configs/<name>.py``) starts from :func:`base_config` and edits
the fields it needs; a user's own config file does the same (see README, "Your own config").
A field's type is fixed by its default here: ``--config.optim.learning_rate=abc`` is refused, and
so is a field that is not listed here (:func:`fcnjax.configs.check_fields`).

Conventions: an empty string means "not set" for paths; ``None`` (an ``ml_collections``
placeholder) means "not set" for numbers; ``model.num_classes = 0`` means "from the dataset".
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

REFERENCE_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s-atonce": 1e-10}
"""The reference's fixed learning rates (summed loss, batch 1): what ``optim.learning_rate =
None`` means with the ``reference`` optimizer."""


def base_config() -> ml_collections.ConfigDict:
  """Every field a run has, with a comment on each (the defaults are a generic SGD FCN-8s run)."""
  c = ml_collections.ConfigDict()
  c.name = ""                          # the experiment's name (set by each experiment config)
  c.preset = ""                        # the preset applied to it ('' = none)

  m = c.model = ml_collections.ConfigDict()
  m.name = "fcn8s"                     # a name of fcnjax.models' registry (fcn32s ... fcn2s,
                                       # fcn_resnet50, d2l_fcn_resnet18, fcn8s-resnet18, ...)
  m.num_classes = 0                    # 0: from the dataset (VOC: 21; folder: --classes or masks)
  m.width_multiplier = 1.0             # scales every backbone width (1/8: a 2.1M-parameter
                                       # VGG FCN-8s)
  m.aligned = False                    # True: no pad-100, input padded to a multiple of 32
  m.learnable_upsampling = False       # the reference keeps the upsampling bilinear and fixed
  m.batch_norm = False                 # BatchNorm after every 3x3 conv (VGG16-BN; not reference)
  m.frozen_batch_norm = False          # BN uses (and keeps) its running statistics in training
                                       # too: fine-tuning at small per-device batches
  m.aux_head = True                    # fcn_resnet50/101: build torchvision's auxiliary head
                                       # on layer3 (trained with loss.aux_weight; unused at
                                       # inference)
  m.pooling = "max"                    # classifiers (fcn_classifier*): masked global "max" or
                                       # "avg" pooling of the class scores
  m.classifier_widths = ()             # fcn_classifier: conv-block widths (() = the Keras
                                       # tutorial's 32, 64, 128, 256, 512; strides 1, 1, 2, 2, 2)
  m.classifier_dropout = 0.2           # fcn_classifier: dropout after every conv (tutorial's)
  m.masked_pooling = True              # classifiers: pool / normalise real pixels only (False:
                                       # padding counts like pixels, the tutorial's way)
  m.precision = "fp32"                 # "fp32" or "bf16" (bf16 compute, fp32 params and loss)
  m.ops = "auto"                       # "auto" | "cpu" | "lax": CPU-friendly ops or plain lax
  m.init = ""                          # weights file to start from (fcnjax.weights.init_from)
  m.reinit_scores = False              # with init: load the backbone only (another class count)
  m.allow_geometry_change = False      # with init: load exact-geometry weights into aligned

  d = c.data = ml_collections.ConfigDict()
  d.kind = "voc"                       # "voc" (VOC / SBD layout), "folder", "pets", "classes"
                                       # (classification: root/<class>/*.jpg, for classifiers)
  d.root = ""                          # voc: VOCdevkit or VOC2012; pets: Oxford-IIIT Pets root;
                                       # classes: the class-per-folder root ('' = built-in)
  d.sbd_root = ""                      # voc: SBD (img/, cls/) or SegmentationClassAug: train on it
  d.val_split = ""                     # voc: split to evaluate on ('' = val; seg11valid with SBD)
  d.images = ""                        # folder: the training images
  d.masks = ""                         # folder: their masks, matched by file stem
  d.val_images = ""                    # folder: validation images ('' = split off val_fraction)
  d.val_masks = ""                     # folder: validation masks
  d.resize_to = ()                     # classes: (h, w) resize (squash) every image to it
                                       # (the tutorial's way, for comparison; () = never resize)
  d.val_fraction = 0.1                 # folder: share of the images held out for validation
  d.mask_values = "index"              # folder: "index" | "binary" | "trimap" | "palette"
  d.classes = ""                       # comma-separated class names ('' = from the data)
  d.ignore_border = False              # pets / trimap masks: border pixels ignored (2 classes)
  d.cache = ""                         # where built-in datasets are written ('' = ~/.cache/fcnjax)
  d.builtin = ml_collections.ConfigDict()  # parameters of the built-in dataset used without data
  d.batch_size = 8                     # images per batch (a multiple of the device count)
  d.pixels_per_batch = config_dict.placeholder(int)  # set: batch size per bucket from pixels
  d.eval_batch_size = config_dict.placeholder(int)   # evaluation batch ('' = as training)
  d.max_buckets = "8"                  # number of size buckets, or "auto" (cost model)
  d.cost_profile = ""                  # "auto"'s costs: a JSON from benchmarks.buckets
                                       # --calibrate ('' = the default for the backend)
  d.granularity = 1                    # bucket sides are multiples of this (32 when aligned)
  d.num_workers = 0                    # grain worker processes for decoding (0: in-process)
  d.on_bad_data = "skip"               # a file bad on decode: "skip" (counted) or "raise"
  d.validate = "header"                # "header": sizes from headers; "full": decode all first
  d.exif = "apply"                     # EXIF orientation of images: "apply" or "ignore"

  a = c.augment = ml_collections.ConfigDict()
  a.flip = True                        # mirror left-right with probability 1/2
  a.scale_range = ()                   # (lo, hi) random scale per image; () = no scaling
  a.color_jitter = 0.0                 # j > 0: brightness/contrast/saturation in [1-j, 1+j]

  o = c.optim = ml_collections.ConfigDict()
  o.optimizer = "sgd"                  # "reference" (Caffe SGD, fixed lr), "sgd", "adamw"
  o.learning_rate = config_dict.placeholder(float)
  o.learning_rate = 0.01               # None with "reference": the paper's rate for the model
  o.momentum = 0.9                     # SGD momentum (reference: 0.99)
  o.weight_decay = 5e-4                # on weights only (biases and upsampling excluded)
  o.schedule = "poly"                  # "poly", "cosine" or "constant" (sgd / adamw)
  o.warmup_steps = 0                   # linear warm-up (capped at a fifth of a short run)
  o.accumulate = 1                     # gradient accumulation over N batches (Caffe's iter_size)

  lo = c.loss = ml_collections.ConfigDict()
  lo.reduction = "mean"                # "mean" over valid pixels, or "sum" (the reference)
  lo.class_weights = ()                # per-class weights of the cross-entropy; () = all 1
  lo.dice_weight = 0.0                 # > 0 adds this times the soft Dice loss (small objects)
  lo.label_smoothing = 0.0             # classifiers: target (1 - eps) * one_hot + eps / C
  lo.aux_weight = 0.5                  # weight of the aux head's cross-entropy (models with one)

  t = c.train = ml_collections.ConfigDict()
  t.epochs = 1                         # passes over the training set
  t.steps = config_dict.placeholder(int)  # set: stop after this many steps (overrides epochs)
  t.seed = 0                           # parameters, data order, augmentation, val split
  t.log_every = 10                     # steps between metrics.jsonl train records
  t.precompile = True                  # compile every bucket's train / eval program at the start,
                                       # in the background (False: each at its first use)
  t.compile_threads = 0                # threads for that (0: auto: min(4, cores) with an
                                       # accelerator; cores // 4 on the CPU backend, so none
                                       # below 4 cores, where compiles would slow the steps)

  e = c.eval = ml_collections.ConfigDict()
  e.every_epochs = 1                   # evaluate every N epochs (and at the end)
  # Protocols: "exact" scores every val image at its own size (the reference protocol of Caffe
  # and pytorch-fcn); "bucketed" zero-pads it to its size bucket first (with the pad-100 FCNs
  # that padding lies inside every prediction's receptive field, so mean IU moves a little).
  # The evaluations during training monitor the run and choose the best checkpoint: bucketed
  # compiles one program per bucket, exact one per distinct image size (41 on the built-in val
  # set, hundreds on VOC val). The final number is the one reported: it follows the reference.
  e.protocol = "bucketed"              # evaluations during training: "bucketed" or "exact"
  e.final_protocol = "exact"           # the last step's evaluation (final_metrics.json), and
                                       # --eval-only: "exact" or "bucketed"
  e.num_prediction_images = 4          # val images in predictions.png

  k = c.checkpoint = ml_collections.ConfigDict()
  k.save_every = 200                   # steps between checkpoints (and after every evaluation)
  k.keep = 3                           # latest checkpoints kept (plus the best by val mean IU)

  out = c.output = ml_collections.ConfigDict()
  out.tensorboard = False              # also write TensorBoard event files (needs tensorboardX)
  out.compile_cache = "~/.cache/fcnjax/xla"  # JAX persistent compilation cache ('' = off)
  return c


def cpu_model(c: ml_collections.ConfigDict, *, epochs: int, eval_every_epochs: int,
              scale_range: tuple = ()) -> ml_collections.ConfigDict:
  """The small CPU run of the default experiments: aligned FCN-8s at 1/8 of VGG16's widths,
  AdamW with a cosine schedule, batch 8 in 4 size buckets, flips (+ ``scale_range``), a
  checkpoint every 250 steps. (Aligned: the exact pad-100 geometry makes every step on small
  images several times slower on a CPU; see benchmarks/RESULTS.md.)"""
  c.model.name = "fcn8s"
  c.model.width_multiplier = 1 / 8
  c.model.aligned = True
  c.optim.optimizer = "adamw"
  c.optim.learning_rate = 3e-3
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 20
  c.loss.reduction = "mean"
  c.train.epochs = epochs
  c.data.batch_size = 8
  c.data.max_buckets = "4"
  c.augment.update(flip=True, scale_range=tuple(scale_range))
  c.eval.every_epochs = eval_every_epochs
  c.checkpoint.save_every = 250
  return c


def quick_check(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps and no evaluation before the end: the ``smoke`` presets of folder / pets."""
  c.train.steps = 20
  c.eval.every_epochs = 1000
  return c


def gpu_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full-width exact FCN-8s, SGD 0.9 with poly decay on the mean loss, bf16 compute, flip +
  scale 0.5-2 augmentation, 50 epochs: a GPU job."""
  c.model.update(name="fcn8s", width_multiplier=1.0, aligned=False, precision="bf16")
  c.optim.update(optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                 schedule="poly", warmup_steps=200)
  c.loss.reduction = "mean"
  c.train.epochs = 50
  c.augment.update(flip=True, scale_range=(0.5, 2.0))
  c.eval.every_epochs = 5
  c.checkpoint.save_every = 1000
  return c


def apply_preset(c: ml_collections.ConfigDict, arg: str | None, presets: dict,
                 default: str | None = None) -> ml_collections.ConfigDict:
  """Apply the preset named ``arg`` (or ``default``) from ``presets`` (name -> function editing
  the config in place); an unknown name is a ValueError listing the known ones."""
  name = arg or default
  if name is None:
    return c
  if name not in presets:
    raise ValueError(f"unknown preset {name!r} for {c.name}; presets: {', '.join(presets)}")
  presets[name](c)
  c.preset = name
  return c
