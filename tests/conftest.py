"""Test-session setup, run before any test module imports jax.

JAX's persistent compilation cache is switched on for the session (a fresh temporary folder), so
the many short training subprocesses of the suite compile each identical XLA program (parameter
initialisers, train steps of the same shapes) once instead of once per process. Results are
unchanged; only compile time is saved.
"""

import os
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fcnjax-tests-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
