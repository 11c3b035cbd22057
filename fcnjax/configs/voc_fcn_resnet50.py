"""torchvision's FCN-ResNet50 (dilated, FCNHead + aux head) on VOC, with torchvision's recipe.

torchvision's reference (``references/segmentation``): SGD momentum 0.9, lr 0.01 with poly
decay (power 0.9), weight decay 1e-4, aux loss weight 0.5, random resize 0.5-2x and flips
(fcnjax keeps every image whole, in size buckets, instead of the 480x480 crop), from the
ImageNet ResNet-50.

Presets (``--config voc_fcn_resnet50:PRESET``):

* ``cpu`` (default): the model at 1/16 of ResNet-50's widths on the built-in VOC-layout dataset
  (or ``data.root``), from scratch, 7 epochs, torchvision's optimizer but lr 0.05: without the
  ImageNet start, at 0.01 the small model learns little in minutes (6 epochs on the built-in
  data: mean IU 0.069 at 0.01, 0.214 at 0.05; ``experiments/voc_fcn_resnet50/README.md``);
  final evaluation bucketed. Minutes on 2 CPU cores.
* ``torchvision``: full width, 30 epochs, batch 32 (torchvision's 8 GPUs x 4), flip + scale
  0.5-2. A GPU job; start it from torchvision's ImageNet ResNet-50 with
  ``--config.model.init=resnet50-0676ba61.pth`` (backbone loaded, heads fresh), or fine-tune
  torchvision's trained ``fcn_resnet50_coco-1167a1af.pth`` (all of it; 21 classes).
"""

from fcnjax.configs import base


def _recipe(c):
  c.optim.update(optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4,
                 schedule="poly", warmup_steps=0)
  c.loss.update(reduction="mean", aux_weight=0.5)
  c.model.aux_head = True


CPU_LEARNING_RATE = 0.05
"""The ``cpu`` preset's lr: 5x torchvision's 0.01, which needs the ImageNet backbone."""


def cpu(c):
  _recipe(c)
  c.model.width_multiplier = 1 / 16
  c.optim.learning_rate = CPU_LEARNING_RATE
  c.optim.warmup_steps = 20
  c.train.epochs = 7
  c.data.batch_size = 8
  c.data.max_buckets = "4"
  c.augment.update(flip=True, scale_range=())
  c.eval.every_epochs = 1
  c.eval.final_protocol = "bucketed"   # exact would compile one program per val size (41)
  c.checkpoint.save_every = 250


def torchvision(c):
  _recipe(c)
  c.model.width_multiplier = 1.0
  c.model.precision = "bf16"
  c.train.epochs = 30
  c.data.batch_size = 32
  c.data.max_buckets = "8"
  c.augment.update(flip=True, scale_range=(0.5, 2.0))
  c.eval.every_epochs = 5
  c.checkpoint.save_every = 1000


PRESETS = {"cpu": cpu, "torchvision": torchvision}


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "voc_fcn_resnet50"
  c.model.name = "fcn_resnet50"
  c.model.num_classes = 21
  c.data.kind = "voc"
  c.data.builtin.update(num_train=2000, num_val=200, scale=0.25, seed=0)
  return base.apply_preset(c, arg, PRESETS, default="cpu")
