"""Data parallelism with ``jax.jit`` + shardings: one mesh axis ``"data"`` over every device.

Batches are sharded along their first axis; parameters and optimizer state are replicated. The
same code runs on one device, on N local devices, and on many hosts started with
:func:`initialize_distributed` (JAX's own multi-process runtime): every process computes the same
batch plan, loads only its rows of each global batch, and :func:`global_batch` assembles the
global array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Start JAX's multi-process runtime if asked to (flags, or ``JAX_COORDINATOR_ADDRESS`` etc.).

  Does nothing for a single process. On CPU, cross-process collectives use gloo.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if not coordinator_address:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis ``"data"`` over the first ``num_devices`` (default: all) devices."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n > len(devices):
    raise ValueError(f"asked for {n} devices, only {len(devices)} available")
  return jax.sharding.Mesh(np.array(devices[:n]), ("data",))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"``."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh) -> dict:
  """This process's rows of a batch (dict of numpy arrays) -> global sharded ``jax.Array``s."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree, mesh):
  """Put every leaf of ``tree`` (host or device values, identical on every process) on all
  devices of ``mesh``. PRNG key arrays keep their type."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)
