"""Serving fcnjax models over HTTP with TensorFlow Serving's REST API (``python -m fcnjax.serve``).

Modules (each one job; importing this package imports none of them):
  * :mod:`~fcnjax.serving.artifact` - reading exported artifacts (jax + numpy only).
  * :mod:`~fcnjax.serving.models` - MODEL (artifact, workdir, weights) -> a thread-safe
    :class:`~fcnjax.serving.models.ServedModel`.
  * :mod:`~fcnjax.serving.images` - request pixels / base64 images -> RGB uint8; class maps ->
    PNG.
  * :mod:`~fcnjax.serving.api` - routes, request parsing and response bodies (pure functions).
  * :mod:`~fcnjax.serving.batching` - optional batching of concurrent same-size requests.
  * :mod:`~fcnjax.serving.server` - the HTTP server: thread pool, limits, draining.

Serving an exported artifact imports neither flax nor the training / data code (fcnjax.train,
fcnjax.data, optax, orbax, grain).
"""
