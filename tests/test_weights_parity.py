"""Numerical parity of loaded weights with PyTorch reference modules (torch==2.13.0 in CI).

The reference modules below are written here, with exactly the state-dict layouts of
torchvision's VGG16 (``features`` / ``classifier`` Sequentials) and of wkentaro/pytorch-fcn's
FCN-32s/16s/8s (named attributes, conv1_1 padding 100, ceil-mode pooling, Caffe crops 19; 5, 27;
5, 9, 31). Weights are random (nonzero score layers, random learnable upscore kernels), saved as
.pth / .safetensors, loaded into fcnjax, and outputs compared: max |diff| ≤ 1e-4 · max |output|.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch (CI installs torch==2.13.0)")
nn = torch.nn
F = torch.nn.functional

import fcnjax.models as M  # noqa: E402
from fcnjax import preprocessing as pp  # noqa: E402
from fcnjax import weights  # noqa: E402

RTOL = 1e-4
DEPTHS = (2, 2, 3, 3, 3)
WIDTHS = (64, 128, 256, 512, 512)
SIZES = [(64, 80), (97, 131), (224, 224)]


def sw(w, mult):
  return max(1, int(round(w * mult)))


def ratio(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def randomize(module: nn.Module, seed: int, learnable_upscore: bool = True):
  """He-normal convs/linears with random biases; random (nonzero) score layers and upscores."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, m in module.named_modules():
      if isinstance(m, nn.ConvTranspose2d):
        if learnable_upscore:
          m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
        else:
          m.weight.copy_(torch_bilinear(m.in_channels, m.kernel_size[0]))
      elif isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return module.eval()


def torch_bilinear(channels: int, k: int) -> torch.Tensor:
  """Diagonal bilinear ConvTranspose2d weight (C, C, k, k) (Caffe's upsample_filt)."""
  f = k // 2
  center = f - 0.5
  og = torch.arange(k, dtype=torch.float64)
  k1 = 1 - (og - center).abs() / f
  w = torch.zeros(channels, channels, k, k, dtype=torch.float64)
  w[range(channels), range(channels)] = torch.outer(k1, k1)
  return w.float()


class TorchvisionVGG16(nn.Module):
  """torchvision's VGG16 layout: features.N (convs at 0,2,5,...,28), avgpool(7), classifier.0/3/6."""

  def __init__(self, mult=1.0, num_classes=10):
    super().__init__()
    layers, c = [], 3
    for d, w in zip(DEPTHS, WIDTHS):
      for _ in range(d):
        layers += [nn.Conv2d(c, sw(w, mult), 3, padding=1), nn.ReLU(inplace=True)]
        c = sw(w, mult)
      layers.append(nn.MaxPool2d(2, 2))
    fc = sw(4096, mult)
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(nn.Linear(c * 49, fc), nn.ReLU(True), nn.Dropout(),
                                    nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(),
                                    nn.Linear(fc, num_classes))


class PytorchFCN(nn.Module):
  """pytorch-fcn's FCN32s / FCN16s / FCN8s / FCN8sAtOnce, parameter names and forward."""

  def __init__(self, n_class=21, stride=8, mult=1.0, atonce=False):
    super().__init__()
    self.stride, self.atonce = stride, atonce
    c = 3
    for b, (d, w) in enumerate(zip(DEPTHS, WIDTHS)):
      for i in range(d):
        setattr(self, f"conv{b + 1}_{i + 1}",
                nn.Conv2d(c, sw(w, mult), 3, padding=100 if (b, i) == (0, 0) else 1))
        c = sw(w, mult)
    fc = sw(4096, mult)
    self.fc6 = nn.Conv2d(c, fc, 7)
    self.fc7 = nn.Conv2d(fc, fc, 1)
    self.score_fr = nn.Conv2d(fc, n_class, 1)
    up = lambda k, s: nn.ConvTranspose2d(n_class, n_class, k, stride=s, bias=False)  # noqa: E731
    if stride == 32:
      self.upscore = up(64, 32)
    if stride <= 16:
      self.score_pool4 = nn.Conv2d(sw(512, mult), n_class, 1)
      self.upscore2 = up(4, 2)
    if stride == 16:
      self.upscore16 = up(32, 16)
    if stride == 8:
      self.score_pool3 = nn.Conv2d(sw(256, mult), n_class, 1)
      self.upscore8 = up(16, 8)
      self.upscore_pool4 = up(4, 2)

  def forward(self, x):
    h = x
    feats = {}
    for b, d in enumerate(DEPTHS):
      for i in range(d):
        h = F.relu(getattr(self, f"conv{b + 1}_{i + 1}")(h))
      h = F.max_pool2d(h, 2, 2, ceil_mode=True)
      feats[b + 1] = h
    h = F.relu(self.fc7(F.relu(self.fc6(h))))  # dropout: eval
    h = self.score_fr(h)
    H, W = x.shape[2], x.shape[3]
    if self.stride == 32:
      h = self.upscore(h)
      return h[:, :, 19:19 + H, 19:19 + W]
    h = self.upscore2(h)
    p4 = feats[4] * 0.01 if self.atonce else feats[4]
    s4 = self.score_pool4(p4)[:, :, 5:5 + h.shape[2], 5:5 + h.shape[3]]
    h = h + s4
    if self.stride == 16:
      h = self.upscore16(h)
      return h[:, :, 27:27 + H, 27:27 + W]
    h = self.upscore_pool4(h)
    p3 = feats[3] * 0.0001 if self.atonce else feats[3]
    s3 = self.score_pool3(p3)[:, :, 9:9 + h.shape[2], 9:9 + h.shape[3]]
    h = self.upscore8(h + s3)
    return h[:, :, 31:31 + H, 31:31 + W]


def torch_out(module, x_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    y = module(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
  return y.permute(0, 2, 3, 1).numpy()


def jax_out(model, x_nhwc) -> np.ndarray:
  model.eval()
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x_nhwc)))


def image(h, w, seed=0):
  return (np.random.default_rng(seed).normal(size=(1, h, w, 3)) * 50).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# VGG16 (torchvision layout): conv features and fc6/fc7 surgery


@pytest.fixture(scope="module")
def tv_vgg(tmp_path_factory):
  ref = randomize(TorchvisionVGG16(mult=1 / 8), seed=1)
  path = tmp_path_factory.mktemp("tv") / "vgg16-tiny.pth"
  torch.save(ref.state_dict(), path)
  return ref, path


def test_vgg16_features_parity_floor_backbone(tv_vgg):
  """torchvision features (pad 1, floor pooling) == fcnjax VGG(aligned, pool='floor') pool5."""
  ref, path = tv_vgg
  bb = M.vgg16(width_multiplier=1 / 8, aligned=True, pool="floor", rngs=nnx.Rngs(0))
  report = weights.load_vgg16_imagenet(bb, path)
  assert report.ignored == ["classifier.6.weight", "classifier.6.bias"]
  assert bb.preprocessing is pp.TORCHVISION
  bb.eval()
  fwd = nnx.jit(lambda m, x: m(x)["pool5"])
  for h, w in SIZES:
    x = image(h, w)
    with torch.no_grad():
      want = ref.features(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    r = ratio(fwd(bb, jnp.asarray(x)), want)
    print(f"vgg16 features {h}x{w}: max|diff|/max|out| = {r:.2e}")
    assert r <= RTOL


def test_vgg16_fc_surgery_matches_classifier(tv_vgg):
  """fc6/fc7 convs on a 7×7 pool5 == torch classifier[0..4] on flatten(avgpool(pool5)).

  At 224×224 torchvision's pool5 is exactly 7×7 (AdaptiveAvgPool2d(7) is the identity), so the
  C×7×7 flatten order of classifier.0 is what is being tested.
  """
  ref, path = tv_vgg
  model = M.fcn8s(21, width_multiplier=1 / 8, rngs=nnx.Rngs(0))  # exact variant: fc6 pad 0
  weights.load_vgg16_imagenet(model, path)
  x = image(224, 224, seed=3)
  with torch.no_grad():
    pool5 = ref.features(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert pool5.shape[2:] == (7, 7)
    want = ref.classifier[:5](torch.flatten(ref.avgpool(pool5), 1)).numpy()
  bb = model.backbone
  p5 = jnp.asarray(pool5.permute(0, 2, 3, 1).numpy())
  got = jax.nn.relu(bb.fc7(jax.nn.relu(bb.fc6(p5))))
  assert got.shape == (1, 1, 1, want.shape[1])
  r = ratio(got[:, 0, 0, :], want)
  print(f"vgg16 fc6/fc7 surgery: max|diff|/max|out| = {r:.2e}")
  assert r <= RTOL
  # A wrong flatten order (H, W, C instead of C, H, W) would not match: the test can fail.
  w0 = ref.classifier[0].weight.detach().numpy()
  fc = w0.shape[0]
  wrong = w0.reshape(fc, 7, 7, -1).transpose(1, 2, 3, 0)
  assert not np.allclose(wrong, np.asarray(bb.fc6.kernel[...]), atol=1e-6)
  # Score layers stay as initialised (zeros).
  assert not np.any(np.asarray(model.score_fr.conv.kernel[...]))


# ---------------------------------------------------------------------------------------------
# pytorch-fcn FCNs


def _fcn_pair(stride, learnable, seed, atonce=False, mult=1 / 8):
  ref = randomize(PytorchFCN(21, stride, mult=mult, atonce=atonce), seed,
                  learnable_upscore=learnable)
  name = {32: "fcn32s", 16: "fcn16s", 8: "fcn8s-atonce" if atonce else "fcn8s"}[stride]
  model = M.MODELS[name](21, width_multiplier=mult, learnable_upsampling=learnable,
                         rngs=nnx.Rngs(0))
  return ref, model


def test_fcn8s_learnable_parity_pth_and_safetensors(tmp_path):
  """Random learnable upscore kernels prove the transposed-conv transposition (no flip)."""
  from safetensors.torch import save_file
  ref, model = _fcn_pair(8, learnable=True, seed=2)
  pth, st = tmp_path / "fcn8s.pth", tmp_path / "fcn8s.safetensors"
  torch.save(ref.state_dict(), pth)
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
  weights.load_pytorch_fcn(model, pth)
  assert model.preprocessing is pp.CAFFE
  from_st = weights.load(st)  # architecture inferred: fcn8s, width 1/8, learnable kernels
  assert from_st.upscore_final.learnable and weights.model_name(from_st) == "fcn8s"
  a, b = weights.state_arrays(model), weights.state_arrays(from_st)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  for h, w in SIZES:
    x = image(h, w, seed=h)
    r = ratio(jax_out(model, x), torch_out(ref, x))
    print(f"fcn8s learnable {h}x{w}: {r:.2e}")
    assert r <= RTOL
  x = image(64, 80, seed=64)
  assert ratio(jax_out(from_st, x), torch_out(ref, x)) <= RTOL
  # Transposing with a flip would be wrong: a flipped kernel changes the output.
  k = model.upscore_final.kernel
  k.set_value(k.get_value()[::-1, ::-1])
  assert ratio(jax_out(model, image(64, 80, seed=64)), torch_out(ref, image(64, 80, seed=64))) > 1e-2


@pytest.mark.parametrize("stride,sizes", [(16, [(97, 131)]), (32, [(45, 59)])])
def test_fcn16s_fcn32s_fixed_bilinear_parity(tmp_path, stride, sizes):
  ref, model = _fcn_pair(stride, learnable=False, seed=stride)
  pth = tmp_path / f"fcn{stride}s.pth"
  torch.save(ref.state_dict(), pth)
  report = weights.load_pytorch_fcn(model, pth)
  assert len(report.checked) == (2 if stride == 16 else 1)  # bilinear kernels verified
  for h, w in sizes:
    x = image(h, w, seed=w)
    r = ratio(jax_out(model, x), torch_out(ref, x))
    print(f"fcn{stride}s fixed {h}x{w}: {r:.2e}")
    assert r <= RTOL


def test_fcn8s_atonce_parity():
  ref, model = _fcn_pair(8, learnable=False, seed=5, atonce=True)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  weights.load_pytorch_fcn(model, sd)
  x = image(97, 131, seed=7)
  r = ratio(jax_out(model, x), torch_out(ref, x))
  print(f"fcn8s-atonce 97x131: {r:.2e}")
  assert r <= RTOL


def test_full_width_fcn8s_parity_64x80():
  """Full-width FCN-8s (134M parameters) at one size, to catch what reduced widths hide."""
  torch.manual_seed(0)
  ref = randomize(PytorchFCN(21, 8, mult=1.0), seed=8, learnable_upscore=False)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}  # in memory: no 540 MB file
  # Architecture inferred from the keys; built abstractly (no ~12 s random init of 134M
  # parameters) since the file sets every parameter.
  model = weights.load(sd)
  assert weights.model_name(model) == "fcn8s" and not model.upscore_final.learnable
  assert weights.describe(model)["width_multiplier"] == "1.0"
  del sd
  x = image(64, 80, seed=11)
  r = ratio(jax_out(model, x), torch_out(ref, x))
  print(f"full-width fcn8s 64x80: {r:.2e}")
  assert r <= RTOL
