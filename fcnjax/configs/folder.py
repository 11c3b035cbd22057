"""Your own images: a folder of images and a folder of masks matched by file stem (any sizes).

Set ``data.images`` / ``data.masks`` (and ``data.val_images`` / ``data.val_masks``, or
``data.val_fraction``), and how the masks store classes in ``data.mask_values``: ``index``
(class ids, 255 = ignore), ``binary`` (0 = background, any non-zero value = foreground),
``trimap`` (Oxford Pets 1/2/3) or ``palette`` (VOC-style palette PNGs). Class names come from
``data.classes`` or from the mask values found. With no ``data.images`` it trains on a built-in
dataset of grey images with binary masks of blob-like objects at varied sizes.

Presets: default (the small CPU model below), ``smoke`` (a few steps, for a quick check),
``full`` (the full-width exact FCN-8s with SGD: a GPU job).
"""

from fcnjax.configs import base


def default(c):
  base.cpu_model(c, epochs=6, eval_every_epochs=2, scale_range=())


def smoke(c):
  default(c)
  base.quick_check(c)


def full(c):
  base.gpu_model(c)


PRESETS = {"default": default, "smoke": smoke, "full": full}


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "folder"
  c.data.kind = "folder"
  c.data.builtin.update(num_train=800, num_val=100, seed=0, min_size=80, max_size=160)
  return base.apply_preset(c, arg, PRESETS, default="default")
