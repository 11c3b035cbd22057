"""Oxford-IIIT Pets: pet / background / border from the trimaps (Deep Learning with Python, ch. 9).

``data.root`` is the Oxford-IIIT Pets folder (``images/*.jpg``, ``annotations/trimaps/*.png``,
``annotations/trainval.txt`` / ``test.txt``): it trains on ``trainval`` and evaluates on
``test``. 3 classes (background, pet, border), or with ``data.ignore_border=True`` 2 classes and
the border ignored. Augmentation as DLwP's (horizontal flip) plus our scale jitter. With no
``data.root`` it trains on a built-in Oxford-layout dataset: one large animal-like object per
image with a trimap border.

Presets: default (the small CPU model below), ``smoke`` (a few steps), ``full`` (full-width
exact FCN-8s with SGD: a GPU job).
"""

from fcnjax.configs import base


def default(c):
  base.cpu_model(c, epochs=5, eval_every_epochs=2, scale_range=(0.75, 1.25))


def smoke(c):
  default(c)
  base.quick_check(c)


def full(c):
  base.gpu_model(c)


PRESETS = {"default": default, "smoke": smoke, "full": full}


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "pets"
  c.data.kind = "pets"
  c.data.builtin.update(num_trainval=800, num_test=100, seed=0, min_size=80, max_size=160)
  return base.apply_preset(c, arg, PRESETS, default="default")
