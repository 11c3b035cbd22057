"""A plain PyTorch FCN-8s (VGG16, exact Caffe variant), written only for ``benchmarks.vs_torch``.

Not a dependency of the package. Same architecture as ``fcnjax.models.fcn8s``: conv1_1 padded
by 100, 2×2/2 ceil-mode max-pools, fc6 as a 7×7 conv (padding 0), fc7 1×1, dropout 0.5 after
both, 1×1 score layers, fixed bilinear transposed convs (×2, ×2, ×8; applied per class with
``F.conv_transpose2d(groups=C)``, the same numbers as Caffe's diagonal C×C kernel) and the
reference crops (pool4 at 5, pool3 at 9, final at 31). NCHW tensors; ``width_multiplier`` scales
every width as fcnjax does (``max(1, round(w * m))``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VGG16_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)


def _scale(w: int, m: float) -> int:
  return max(1, int(round(w * m)))


def bilinear_kernel_1d(factor: int) -> np.ndarray:
  size = 2 * factor
  center = factor - 0.5
  og = np.arange(size, dtype=np.float64)
  return (1 - np.abs(og - center) / factor).astype(np.float32)


class TorchFCN8s(nn.Module):
  def __init__(self, num_classes: int = 21, width_multiplier: float = 1.0, dropout: float = 0.5):
    super().__init__()
    widths = [_scale(w, width_multiplier) for w in VGG16_WIDTHS]
    fc = _scale(4096, width_multiplier)
    self.blocks = nn.ModuleList()
    c = 3
    for i, (d, w) in enumerate(zip(VGG16_DEPTHS, widths)):
      convs = nn.ModuleList()
      for j in range(d):
        convs.append(nn.Conv2d(c, w, 3, padding=100 if (i == 0 and j == 0) else 1))
        c = w
      self.blocks.append(convs)
    self.fc6 = nn.Conv2d(c, fc, 7)
    self.fc7 = nn.Conv2d(fc, fc, 1)
    self.drop = nn.Dropout(dropout)
    self.score_fr = nn.Conv2d(fc, num_classes, 1)
    self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
    self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
    self.num_classes = num_classes
    for f in (2, 8):
      k = torch.from_numpy(np.outer(bilinear_kernel_1d(f), bilinear_kernel_1d(f)))
      self.register_buffer(f"up{f}", k[None, None].repeat(num_classes, 1, 1, 1))  # (C,1,2f,2f)

  def _up(self, x, f):
    return F.conv_transpose2d(x, getattr(self, f"up{f}"), stride=f, groups=self.num_classes)

  def forward(self, x):
    h, w = x.shape[2], x.shape[3]
    feats = []
    for convs in self.blocks:
      for conv in convs:
        x = F.relu(conv(x))
      x = F.max_pool2d(x, 2, 2, ceil_mode=True)
      feats.append(x)
    x = self.drop(F.relu(self.fc6(x)))
    x = self.drop(F.relu(self.fc7(x)))
    s = self._up(self.score_fr(x), 2)
    p4 = self.score_pool4(feats[3])
    s = s + p4[:, :, 5:5 + s.shape[2], 5:5 + s.shape[3]]
    s = self._up(s, 2)
    p3 = self.score_pool3(feats[2])
    s = s + p3[:, :, 9:9 + s.shape[2], 9:9 + s.shape[3]]
    s = self._up(s, 8)
    return s[:, :, 31:31 + h, 31:31 + w]


def load_from_fcnjax(tmodel: TorchFCN8s, jmodel) -> None:
  """Copy an fcnjax FCN-8s's parameters (NHWC/HWIO) into ``tmodel`` (NCHW/OIHW)."""

  def put(tconv, jconv):
    k = np.asarray(jconv.kernel[...])                       # (kh, kw, in, out)
    tconv.weight.data.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
    tconv.bias.data.copy_(torch.from_numpy(np.asarray(jconv.bias[...]).copy()))

  bb = jmodel.backbone
  for tconvs, block in zip(tmodel.blocks, bb.blocks):
    for tconv, jconv in zip(tconvs, block.convs):
      put(tconv, jconv)
  put(tmodel.fc6, bb.fc6)
  put(tmodel.fc7, bb.fc7)
  put(tmodel.score_fr, jmodel.score_fr.conv)
  put(tmodel.score_pool4, jmodel.score_skips[0].conv)
  put(tmodel.score_pool3, jmodel.score_skips[1].conv)
