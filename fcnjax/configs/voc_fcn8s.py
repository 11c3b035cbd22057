"""FCN-8s on PASCAL VOC (or SBD + VOC), or on the built-in VOC-layout dataset when no VOC is given.

Presets (``--config voc_fcn8s:PRESET``; default ``smoke``):

* ``smoke``: an aligned FCN-8s at 1/8 of VGG16's widths, AdamW with cosine decay, batch 8,
  ``auto`` size buckets (3 on the built-in data), 4 epochs. With no ``data.root`` it trains on the built-in dataset (2,000 train /
  200 val images at 1/4 of VOC's sizes): minutes on a laptop CPU.
* ``fast``: full-width exact FCN-8s, SGD 0.9 with poly decay on the mean loss, bf16 compute,
  batch 8 of real, uncropped images in 8 size buckets, flip + scale 0.5-2. A GPU job.
* ``paper``: the reference recipe: batch 1, SGD momentum 0.99, summed loss, the fixed learning
  rate of the model (FCN-32s 1e-10, 16s 1e-12, 8s 1e-14), weight decay 5e-4, biases at 2x lr, no
  augmentation, 100k iterations; set ``data.sbd_root`` to train on SBD and evaluate on seg11valid.
  Its final evaluation (and ``--eval-only``) scores every image at its own size, as the reference
  does (``eval.final_protocol = "exact"``, set explicitly).
"""

from fcnjax.configs import base

def smoke(c):
  base.cpu_model(c, epochs=4, eval_every_epochs=1)
  # K from the measured costs of this backend and the run's 4 epochs (3 train buckets on the
  # built-in data): a 4th bucket for 24 images cost a 4 s compile to save 0.6 s of padding
  c.data.max_buckets = "auto"


def fast(c):
  c.model.name = "fcn8s"
  c.optim.update(optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                 schedule="poly", warmup_steps=500)
  c.loss.reduction = "mean"
  c.model.precision = "bf16"
  c.train.epochs = 50
  c.data.batch_size = 8
  c.data.max_buckets = "8"
  c.augment.update(flip=True, scale_range=(0.5, 2.0))
  c.eval.every_epochs = 5
  c.checkpoint.save_every = 1000


def paper(c):
  c.model.name = "fcn8s"
  c.optim.update(optimizer="reference", momentum=0.99, weight_decay=5e-4)
  c.optim.learning_rate = None         # base.REFERENCE_LR of the model, when the run starts
  c.loss.reduction = "sum"
  c.train.steps = 100_000
  c.data.batch_size = 1
  c.data.max_buckets = "16"
  c.augment.update(flip=False, scale_range=())
  c.eval.every_epochs = 1
  c.eval.final_protocol = "exact"      # the reference scores each image at its own size
  c.checkpoint.save_every = 4000


PRESETS = {"smoke": smoke, "fast": fast, "paper": paper}


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "voc_fcn8s"
  c.data.kind = "voc"
  c.model.num_classes = 21
  c.data.builtin.update(num_train=2000, num_val=200, scale=0.25, seed=0)
  return base.apply_preset(c, arg, PRESETS, default="smoke")
