"""Seeing inside a model: Grad-CAM, intermediate activations and filter patterns.

* :func:`gradcam` / :func:`gradcam_result` - where the evidence for a class is (classifier: the
  class logit; segmenter: the class's logits summed over a region) at a named layer.
* :func:`activations` - the named intermediate maps for an image.
* :func:`filter_patterns` - the input each filter responds to most (gradient ascent from noise).
* :mod:`fcnjax.interpret.plots` - overlays and grids (matplotlib, Agg).
* :mod:`fcnjax.interpret.layers` - layer names and shapes (as :mod:`fcnjax.models.summary`),
  the default layer (the last conv block), each layer's place on the image.

Inputs are (B, H, W, 3) float arrays in the model's input convention (``model.preprocessing``
applied to RGB uint8). The command line: ``python -m fcnjax.interpret --help``.
"""

from fcnjax.interpret.intermediates import activations
from fcnjax.interpret.filters import FilterPatterns, filter_patterns
from fcnjax.interpret.grad_cam import GradCAM, gradcam, gradcam_result
from fcnjax.interpret.layers import UnknownLayer, default_layer, layer_names, layer_shapes

__all__ = ["activations", "filter_patterns", "FilterPatterns", "gradcam", "gradcam_result",
           "GradCAM", "UnknownLayer", "default_layer", "layer_names", "layer_shapes"]
