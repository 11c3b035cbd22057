"""A plain PyTorch FCN-ResNet50 with torchvision's structure and state-dict keys, written only
for ``benchmarks.vs_torch --model fcn_resnet50`` (torchvision is not used; not a dependency of
the package).

``TorchFCNResNet50(num_classes, width_multiplier)``: ResNet-50 (Bottleneck v1.5, BatchNorm) with
``replace_stride_with_dilation=(False, True, True)``, torchvision's ``FCNHead`` on layer4 and
``F.interpolate(..., mode="bilinear", align_corners=False)`` back to the input size; no aux head.
NCHW. Widths scale as fcnjax's (``max(1, round(w * m))``). ``state_dict()`` keys are
torchvision's ``fcn_resnet50`` keys, which ``fcnjax.weights`` loads (layout
``torchvision-fcn-resnet``), so both frameworks run the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _scale(w: int, m: float) -> int:
  return max(1, int(round(w * m)))


class Bottleneck(nn.Module):
  def __init__(self, cin, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
    self.relu, self.downsample = nn.ReLU(inplace=True), downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    return self.relu(self.bn3(self.conv3(y)) + idt)


class Backbone(nn.Module):
  def __init__(self, m: float):
    super().__init__()
    self.inplanes, self.dilation = _scale(64, m), 1
    self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
    self.bn1, self.relu = nn.BatchNorm2d(self.inplanes), nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make(_scale(64, m), 3)
    self.layer2 = self._make(_scale(128, m), 4, 2)
    self.layer3 = self._make(_scale(256, m), 6, 2, dilate=True)
    self.layer4 = self._make(_scale(512, m), 3, 2, dilate=True)

  def _make(self, planes, n, stride=1, dilate=False):
    prev = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    ds = None
    if stride != 1 or self.inplanes != planes * 4:
      ds = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                         nn.BatchNorm2d(planes * 4))
    blocks = [Bottleneck(self.inplanes, planes, stride, ds, prev)]
    self.inplanes = planes * 4
    blocks += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, n)]
    return nn.Sequential(*blocks)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchFCNResNet50(nn.Module):
  def __init__(self, num_classes: int = 21, width_multiplier: float = 1.0):
    super().__init__()
    self.backbone = Backbone(width_multiplier)
    c = self.backbone.inplanes
    self.classifier = nn.Sequential(nn.Conv2d(c, c // 4, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(c // 4), nn.ReLU(), nn.Dropout(0.1),
                                    nn.Conv2d(c // 4, num_classes, 1))

  def forward(self, x):
    return F.interpolate(self.classifier(self.backbone(x)), size=x.shape[-2:], mode="bilinear",
                         align_corners=False)


def numpy_state_dict(module) -> dict:
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def randomise_batch_norm(module, seed: int = 0) -> None:
  """Non-trivial BatchNorm statistics and affine parameters (a fresh model's are 0 / 1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in module.modules():
      if isinstance(mod, nn.BatchNorm2d):
        mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
        mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
        mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
