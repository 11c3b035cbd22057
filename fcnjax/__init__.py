"""fcnjax: Fully Convolutional Networks for semantic segmentation in JAX / Flax NNX."""

__version__ = "0.1.0"
