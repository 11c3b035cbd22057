"""The d2l FCN (ResNet-18 + bilinear transposed conv) on VOC, uncropped in size buckets.

The d2l chapter (PyTorch version) trains its FCN with SGD, lr 1e-3, weight decay 1e-3 (no
momentum), 5 epochs, batch 32, on 320x480 random crops, from torchvision's ImageNet ResNet-18;
its data loader *drops* every image smaller than the crop (349 of the 1,462 VOC 2012 `train`
images in the shipped size table, and 368 of 1,443 `val` images). fcnjax trains the same network
on every image at its own size, in size buckets (``experiments/d2l_fcn_resnet18/README.md``).

Presets (``--config d2l_fcn_resnet18:PRESET``):

* ``cpu`` (default): the network at 1/8 of ResNet-18's widths on the built-in VOC-layout dataset
  (or ``data.root``), from scratch, 3 epochs: AdamW 3e-3 with cosine decay and flips instead of
  d2l's plain SGD 1e-3, which needs the ImageNet start to learn in 5 epochs; final evaluation
  bucketed. Minutes on 2 CPU cores.
* ``d2l``: d2l's recipe at full width (SGD 1e-3, weight decay 1e-3, no momentum, constant rate,
  5 epochs, batch 32, no augmentation), uncropped. A GPU job; start it from torchvision's
  ImageNet ResNet-18 with ``--config.model.init=resnet18-f37072fd.pth`` (the backbone is loaded,
  the 1x1 conv and transposed conv start fresh / bilinear).
"""

from fcnjax.configs import base


def cpu(c):
  c.model.width_multiplier = 1 / 8
  c.optim.update(optimizer="adamw", learning_rate=3e-3, weight_decay=1e-4, schedule="cosine",
                 warmup_steps=20)
  c.train.epochs = 3
  c.data.batch_size = 8
  c.data.max_buckets = "4"
  c.augment.update(flip=True, scale_range=())
  c.eval.every_epochs = 3
  c.eval.final_protocol = "bucketed"   # exact would compile one program per val size (41)
  c.checkpoint.save_every = 250


def d2l(c):
  c.model.width_multiplier = 1.0
  c.optim.update(optimizer="sgd", learning_rate=1e-3, momentum=0.0, weight_decay=1e-3,
                 schedule="constant", warmup_steps=0)
  c.train.epochs = 5
  c.data.batch_size = 32
  c.data.max_buckets = "8"
  c.augment.update(flip=False, scale_range=())
  c.eval.every_epochs = 1
  c.checkpoint.save_every = 1000


PRESETS = {"cpu": cpu, "d2l": d2l}


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "d2l_fcn_resnet18"
  c.model.name = "d2l_fcn_resnet18"
  c.model.num_classes = 21
  c.data.kind = "voc"
  c.loss.reduction = "mean"            # d2l: cross-entropy averaged over pixels
  c.data.builtin.update(num_train=2000, num_val=200, scale=0.25, seed=0)
  return base.apply_preset(c, arg, PRESETS, default="cpu")
