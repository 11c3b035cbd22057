"""Named intermediates of a forward pass, and additive perturbations at them.

Every model records its named intermediates (``model(x, return_intermediates=True)``, the rows
of :mod:`fcnjax.models.summary`) through :func:`record`: ``x = record(out, "conv5_3", x)`` stores
``x`` under its name and returns what the forward passes on. Outside :func:`perturbed` that is
``x`` itself (no operation is added, so the compiled forward is unchanged); inside
``with perturbed({"conv5_3": delta}):`` it is ``x + delta``, which makes the gradient of any
output with respect to a named intermediate one ``jax.grad`` with respect to ``delta`` at
``delta = 0`` (Grad-CAM, :mod:`fcnjax.interpret`). The recorded value is then ``x + delta`` too.

The perturbations live in a context variable read while the forward is traced, so they work
inside ``jax.jit`` / ``jax.grad`` as long as the ``with`` block is inside the traced function.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_DELTAS: contextvars.ContextVar = contextvars.ContextVar("fcnjax_tap_deltas", default=None)


def record(out, name: str, x: jax.Array, *, key: str | None = None) -> jax.Array:
  """``out[key or name] = x`` plus the active perturbation at ``name`` (if any); returns it.

  ``name`` is the intermediate's model-wide name (what :func:`perturbed` is keyed by); ``key``
  a different key for ``out`` when a sub-module's dict uses local names (a VGG block's
  ``"conv1"`` is the model's ``"conv3_1"``)."""
  deltas = _DELTAS.get()
  if deltas is not None and name in deltas:
    x = x + deltas[name].astype(x.dtype)
    deltas.pop(name)  # applied once; what is left at the end was never recorded
  out[key or name] = x
  return x


@contextlib.contextmanager
def perturbed(deltas: dict):
  """Add ``deltas[name]`` to the intermediate ``name`` in forwards run inside the block.

  Raises ``KeyError`` on exit if a name was never recorded (a typo would otherwise silently
  give zero gradients)."""
  pending = dict(deltas)
  token = _DELTAS.set(pending)
  try:
    yield
  finally:
    _DELTAS.reset(token)
  if pending:
    raise KeyError(f"no intermediate named {sorted(pending)} was recorded by the forward")
