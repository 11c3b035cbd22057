"""The variable-size FCN classifier on class-per-folder images (or the built-in 5-class data).

The Keras tutorial's fully convolutional classifier (conv blocks of VALID 3x3 conv + dropout +
BN + ReLU, strides 1, 1, 2, 2, 2; a 1x1 conv head; global max pooling), trained on every image at
its own size in size buckets, with **masked** pooling and BatchNorm statistics (the padding of a
bucket never reaches the pooled value) - instead of the tutorial's resize-to-one-size or
pad-with-zeros-and-hope. ``data.root`` is a ``root/<class>/*.jpg`` folder (tf_flowers /
ImageFolder layout); without it the built-in dataset: 5 classes told apart by fine patterns, half
of the images long thin strips (h ~ 30, w ~ 300), half photo-like sizes.

Presets (``--config classify:PRESET``):

* ``cpu`` (default): the tutorial's widths / 4, AdamW 3e-3 with cosine decay, batch 16 in 4 size
  buckets, 6 epochs; minutes on 2 CPU cores (experiments/classify/README.md).
* ``tutorial``: the tutorial's full widths and its optimiser (Adam 1e-4), 30 epochs: a GPU job.
* ``resize`` / ``padzeros``: the ``cpu`` run the tutorial's two ways, for comparison: every image
  squashed to 64 x 64, or zero-padded with unmasked pooling / BatchNorm.
"""

from fcnjax.configs import base


def cpu(c):
  c.model.width_multiplier = 1 / 4
  c.optim.update(optimizer="adamw", learning_rate=3e-3, weight_decay=1e-4, schedule="cosine",
                 warmup_steps=20)
  c.train.epochs = 6
  c.data.batch_size = 16
  c.data.max_buckets = "4"
  c.eval.every_epochs = 2
  c.checkpoint.save_every = 500


def tutorial(c):
  c.model.width_multiplier = 1.0
  c.optim.update(optimizer="adamw", learning_rate=1e-4, weight_decay=0.0, schedule="constant",
                 warmup_steps=0)
  c.train.epochs = 30
  c.data.batch_size = 32
  c.data.max_buckets = "8"
  c.eval.every_epochs = 2
  c.checkpoint.save_every = 1000


def resize(c):
  cpu(c)
  c.data.resize_to = (64, 64)
  c.data.max_buckets = "1"
  c.augment.flip = False  # a flip of a squashed image is what the cpu run gets anyway


def padzeros(c):
  cpu(c)
  c.model.masked_pooling = False


PRESETS = {"cpu": cpu, "tutorial": tutorial, "resize": resize, "padzeros": padzeros}


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "classify"
  c.model.name = "fcn_classifier"
  c.model.pooling = "max"
  c.data.kind = "classes"
  c.loss.reduction = "mean"
  c.augment.update(flip=True, scale_range=())
  c.eval.protocol = c.eval.final_protocol = "bucketed"  # masked pooling: bucketed is exact
  c.data.builtin.update(num_train=1000, num_val=250, seed=0)
  return base.apply_preset(c, arg, PRESETS, default="cpu")
