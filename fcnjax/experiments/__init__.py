"""Runnable experiments (``python -m fcnjax.experiments.<name>``)."""
