"""Check programs run in a subprocess with 4 simulated CPU devices (see ``prelude``).

Each ``check_*.py`` compares results on a batch sharded over the devices against one device with
``np.testing`` assertions and exits non-zero on failure. Run one from ``tests/``::

    cd tests && python -m sharded.check_loss

The pytest tests (``test_train_loss.py``, ``test_train_metrics.py``) do that through
``train_helpers.run_sharded_check``. The names do not match ``test_*.py``, so pytest does not
collect them, and they only run under ``__main__``.
"""
