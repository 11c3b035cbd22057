"""Inference: load a trained model (workdir, weights file or exported artifact) and predict.

    from fcnjax.inference import Predictor
    p = Predictor("runs/smoke-fcn8s")              # a workdir, .safetensors, .pth or export
    classes = p.predict(rgb)                       # (H, W) int32 class map, rgb (H, W, 3) uint8
    probs = p.predict_proba(rgb)                   # (H, W, C) float32 class probabilities
    for r in p.predict_many(images): r.classes     # bucketed batches, results in input order
"""

from fcnjax.inference.images import ImageReadError, read_image, to_rgb
from fcnjax.inference.loading import LoadedModel, ModelLoadError, load_model
from fcnjax.inference.predictor import Prediction, Predictor

__all__ = ["ImageReadError", "LoadedModel", "ModelLoadError", "Prediction", "Predictor",
           "load_model", "read_image", "to_rgb"]
