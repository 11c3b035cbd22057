"""torchvision ResNet / FCN-ResNet state dicts into fcnjax, checked against PyTorch.

The PyTorch modules below are written here with exactly torchvision's structure and state-dict
keys (torchvision itself is not used): random weights, non-trivial BatchNorm statistics, eval
mode. Outputs agree at odd, non-square and square sizes to max |diff| <= 1e-4 x max |output|.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from fcnjax import models, weights  # noqa: E402
from fcnjax.models import resnet_fcn  # noqa: E402
from fcnjax.weights import layouts  # noqa: E402
from fcnjax.weights.errors import WeightsError  # noqa: E402

SIZES = [(33, 47), (64, 64), (50, 97)]
RTOL = 1e-4  # of max |output|


def conv3x3(i, o, stride=1, dilation=1):
  return nn.Conv2d(i, o, 3, stride, padding=dilation, dilation=dilation, bias=False)


class TBasic(nn.Module):
  expansion = 1

  def __init__(self, i, p, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1, self.bn1 = conv3x3(i, p, stride), nn.BatchNorm2d(p)
    self.conv2, self.bn2 = conv3x3(p, p), nn.BatchNorm2d(p)
    self.relu, self.downsample = nn.ReLU(), downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(y)) + idt)


class TBottleneck(nn.Module):
  expansion = 4

  def __init__(self, i, p, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(i, p, 1, bias=False), nn.BatchNorm2d(p)
    self.conv2, self.bn2 = conv3x3(p, p, stride, dilation), nn.BatchNorm2d(p)
    self.conv3, self.bn3 = nn.Conv2d(p, p * 4, 1, bias=False), nn.BatchNorm2d(p * 4)
    self.relu, self.downsample = nn.ReLU(), downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    return self.relu(self.bn3(self.conv3(y)) + idt)


class TResNet(nn.Module):
  """torchvision.models.ResNet's structure, widths scaled by ``m``."""

  def __init__(self, block, layers, m=1.0, dilate=(False, False, False), fc=True):
    super().__init__()
    w = lambda c: max(1, int(round(c * m)))  # noqa: E731
    self.inplanes, self.dilation = w(64), 1
    self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
    self.bn1, self.relu = nn.BatchNorm2d(self.inplanes), nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make(block, w(64), layers[0])
    self.layer2 = self._make(block, w(128), layers[1], 2, dilate[0])
    self.layer3 = self._make(block, w(256), layers[2], 2, dilate[1])
    self.layer4 = self._make(block, w(512), layers[3], 2, dilate[2])
    if fc:
      self.fc = nn.Linear(w(512) * block.expansion, 1000)

  def _make(self, block, planes, n, stride=1, dilate=False):
    prev = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    ds = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      ds = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                         nn.BatchNorm2d(planes * block.expansion))
    out = [block(self.inplanes, planes, stride, ds, prev)]
    self.inplanes = planes * block.expansion
    out += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, n)]
    return nn.Sequential(*out)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer1(x)
    x = self.layer2(x)
    l3 = self.layer3(x)
    return l3, self.layer4(l3)


def t_fcn_head(i, c):
  return nn.Sequential(nn.Conv2d(i, i // 4, 3, padding=1, bias=False), nn.BatchNorm2d(i // 4),
                       nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(i // 4, c, 1))


class TFCN(nn.Module):
  """torchvision.models.segmentation.FCN on a dilated ResNet (``backbone``, ``classifier``,
  ``aux_classifier``)."""

  def __init__(self, backbone, c, aux):
    super().__init__()
    self.backbone = backbone
    ch = backbone.inplanes
    self.classifier = t_fcn_head(ch, c)
    self.aux_classifier = t_fcn_head(ch // 2, c) if aux else None

  def forward(self, x):
    l3, l4 = self.backbone.features(x)
    out = F.interpolate(self.classifier(l4), size=x.shape[-2:], mode="bilinear",
                        align_corners=False)
    if self.aux_classifier is None:
      return out, None
    return out, F.interpolate(self.aux_classifier(l3), size=x.shape[-2:], mode="bilinear",
                              align_corners=False)


def randomise(module, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.Conv2d):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g)
                       * (2.0 / m.weight[0].numel()) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return module.eval()


def state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def inputs(h, w, seed=0):
  return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


def close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  err = float(np.max(np.abs(got - want)))
  assert err <= RTOL * float(np.max(np.abs(want))), (err, float(np.max(np.abs(want))))


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("depth, m", [(18, 0.25), (50, 0.125)])
def test_resnet_backbone_matches_pytorch(depth, m):
  block = TBasic if depth == 18 else TBottleneck
  tm = randomise(TResNet(block, models.resnet.DEPTHS[depth], m), seed=depth)
  sd = state_dict(tm)
  assert layouts.infer_layout(sd) == layouts.TORCHVISION_RESNET
  model = weights.load(sd)  # builds resnet<depth> at this width from the keys
  assert weights.model_name(model) == f"resnet{depth}"
  assert model.width_multiplier == m
  model.eval()
  for h, w in SIZES:
    x = inputs(h, w)
    with torch.no_grad():
      l3, l4 = tm.features(nchw(x))
    feats = model(jnp.asarray(x))
    close(feats["layer3"], nhwc(l3))
    close(feats["layer4"], nhwc(l4))


@pytest.mark.parametrize("aux", [True, False])
def test_fcn_resnet50_matches_pytorch(aux):
  tm = randomise(TFCN(TResNet(TBottleneck, (3, 4, 6, 3), 0.125, (False, True, True), fc=False),
                      5, aux), seed=1)
  sd = state_dict(tm)
  assert layouts.infer_layout(sd) == layouts.TORCHVISION_FCN_RESNET
  model = weights.load(sd)
  assert isinstance(model, resnet_fcn.TorchvisionFCN) and model.num_classes == 5
  assert (model.aux_classifier is not None) == aux
  model.eval()
  for h, w in SIZES:
    x = inputs(h, w, seed=h)
    with torch.no_grad():
      out, aux_out = tm(nchw(x))
    logits, aux_logits = model(jnp.asarray(x), return_aux=True)
    close(logits, nhwc(out))
    if aux:
      close(aux_logits, nhwc(aux_out))
    else:
      assert aux_logits is None


def test_fcn_resnet_aux_head_in_file_is_ignored_for_a_model_without_one():
  tm = randomise(TFCN(TResNet(TBottleneck, (3, 4, 6, 3), 0.125, (False, True, True), fc=False),
                      3, True))
  model = models.build_model("fcn_resnet50", 3, width_multiplier=0.125, aux=False)
  from fcnjax.weights.loading import apply
  report = apply(model, state_dict(tm), layouts.TORCHVISION_FCN_RESNET)
  assert any(k.startswith("aux_classifier.") for k in report.ignored)
  assert model.preprocessing.name == "torchvision-rgb-imagenet"


def test_full_width_resnet50_at_one_small_size():
  tm = randomise(TResNet(TBottleneck, (3, 4, 6, 3), 1.0), seed=3)
  model = weights.load(state_dict(tm))
  model.eval()
  x = inputs(40, 56)
  with torch.no_grad():
    _, l4 = tm.features(nchw(x))
  close(model(jnp.asarray(x))["layer4"], nhwc(l4))


def test_d2l_fcn_matches_the_d2l_network():
  """d2l: ResNet-18 minus pool/fc, 1x1 conv, ConvTranspose2d(k=64, s=32, p=16). On multiples
  of 32 the output is d2l's; on other sizes it is the top-left H x W of d2l's output."""
  c = 4
  tr = randomise(TResNet(TBasic, (2, 2, 2, 2), 0.25, fc=False), seed=5)
  final = nn.Conv2d(tr.inplanes, c, 1)
  up = nn.ConvTranspose2d(c, c, 64, 32, 16)
  with torch.no_grad():
    up.weight.copy_(torch.randn(up.weight.shape) * 0.05)
    up.bias.copy_(torch.randn(c) * 0.1)
  model = models.build_model("d2l_fcn_resnet18", c, width_multiplier=0.25)
  weights.load(state_dict(tr), model)  # the backbone from the torchvision keys
  model.final_conv.kernel.set_value(jnp.asarray(final.weight.detach().numpy().transpose(2, 3, 1, 0)))
  model.final_conv.bias.set_value(jnp.asarray(final.bias.detach().numpy()))
  model.transpose_conv.kernel.set_value(jnp.asarray(up.weight.detach().numpy().transpose(2, 3, 0, 1)))
  model.transpose_conv.bias.set_value(jnp.asarray(up.bias.detach().numpy()))
  model.eval()
  for h, w in [(64, 96), (50, 97), (33, 47)]:
    x = inputs(h, w)
    with torch.no_grad():
      _, l4 = tr.features(nchw(x))
      want = nhwc(up(final(l4)))
    assert want.shape[1] >= h and want.shape[2] >= w
    close(model(jnp.asarray(x)), want[:, :h, :w])


def test_imagenet_resnet_into_a_segmenter_loads_the_backbone_only():
  tr = randomise(TResNet(TBasic, (2, 2, 2, 2), 0.25), seed=2)
  sd = state_dict(tr)
  model = weights.load(sd, model_name_override="fcn8s-resnet18", num_classes=3)
  assert weights.model_name(model) == "fcn8s-resnet18"
  model.eval()
  x = inputs(37, 41)
  with torch.no_grad():
    _, l4 = tr.features(nchw(x))
  _, out = model(jnp.asarray(x), return_intermediates=True)
  close(out["layer4.1"], nhwc(l4))
  assert model(jnp.asarray(x)).shape == (2, 37, 41, 3)


def test_resnet_layout_errors_are_clear():
  tr = randomise(TResNet(TBasic, (2, 2, 2, 2), 0.25))
  sd = state_dict(tr)
  model = models.build_model("resnet18", width_multiplier=0.25)
  bad = dict(sd)
  bad.pop("layer2.0.downsample.0.weight")
  with pytest.raises(WeightsError, match="layer2.0.downsample.0.weight"):
    weights.load(bad, model)
  bad = dict(sd)
  bad["layer1.0.conv1.weight"] = bad["layer1.0.conv1.weight"][:, :, :1]
  with pytest.raises(WeightsError, match="layer1.0.conv1.weight"):
    weights.load(bad, model)
  bad = {k: v for k, v in sd.items() if not k.startswith("layer3.1.")}
  with pytest.raises(WeightsError, match=r"\(2, 2, 1, 2\) blocks per stage"):
    weights.load(bad)
  wider = models.build_model("resnet18", width_multiplier=0.5)
  with pytest.raises(WeightsError, match="conv1.weight"):
    weights.load(sd, wider)


def test_save_and_load_round_trip_rebuilds_the_resnet_model(tmp_path):
  model = models.build_model("fcn_resnet50", 4, width_multiplier=0.125, aux=False, seed=1)
  path = tmp_path / "m.safetensors"
  weights.save(model, path)
  back = weights.load(path)
  assert isinstance(back, resnet_fcn.TorchvisionFCN) and back.aux_classifier is None
  assert back.num_classes == 4 and back.preprocessing.name == "torchvision-rgb-imagenet"
  model.eval()
  back.eval()
  x = jnp.asarray(inputs(29, 35))
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(back(x)))


def test_predict_loads_a_resnet_weights_file(tmp_path):
  from fcnjax.inference.loading import load_weights_file
  model = models.build_model("d2l_fcn_resnet18", 3, width_multiplier=0.125, seed=0)
  path = tmp_path / "d2l.safetensors"
  weights.save(model, path)
  loaded = load_weights_file(path)
  assert "d2l_fcn_resnet18" in loaded.description and "exact" not in loaded.description
