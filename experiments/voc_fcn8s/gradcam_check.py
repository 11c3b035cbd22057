"""Where does the Grad-CAM of a trained segmenter peak? A check on VOC-layout val data.

    python experiments/voc_fcn8s/gradcam_check.py WORKDIR VOC2012_DIR [--images 60] \
        [--layers fc7,pool4,pool3,fuse_pool3]

For each of the first ``--images`` val images (``ImageSets/Segmentation/val.txt``) and each
object class in its ground truth, Grad-CAM of that class at each layer, the score being the
class's logits summed over the pixels the model predicts as the class (the CLI's default); a
hit when the heatmap's peak lies on a ground-truth pixel of the class. Pairs the model does not
predict at all have an empty region and count as misses. Prints per layer the hit fraction, and
the chance level (the mean share of the image the class covers). Used for the README.
"""

import argparse
import json
import pathlib

import numpy as np
from PIL import Image

from fcnjax.inference import loading
from fcnjax.interpret import grad_cam


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdir")
  p.add_argument("voc", type=pathlib.Path, help="the VOC2012 folder (JPEGImages, ...)")
  p.add_argument("--images", type=int, default=60)
  p.add_argument("--layers", default="fc7,pool4,pool3,fuse_pool3")
  args = p.parse_args()
  loaded = loading.load_model(args.workdir)
  layers = args.layers.split(",")
  names = (args.voc / "ImageSets/Segmentation/val.txt").read_text().split()[:args.images]
  hits = {layer: [] for layer in layers}
  share = []
  for name in names:
    rgb = np.asarray(Image.open(args.voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))
    truth = np.asarray(Image.open(args.voc / "SegmentationClass" / f"{name}.png"))
    x = loaded.preprocessing(rgb[None])
    for cls in sorted(set(np.unique(truth).tolist()) - {0, 255}):
      share.append(float(np.mean(truth == cls)))
      for layer in layers:
        heat = grad_cam.gradcam(loaded.model, x, cls, layer)[0]
        y, x_ = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits[layer].append(bool(heat.max() > 0 and truth[y, x_] == cls))
  report = {"images": len(names), "pairs": len(share), "chance": float(np.mean(share)),
            "hit_fraction": {layer: float(np.mean(h)) for layer, h in hits.items()}}
  print(json.dumps(report))


if __name__ == "__main__":
  main()
