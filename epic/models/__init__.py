"""Model families behind one interface (interface.py), found by name (registry.py), loaded from any weight source
(loading.py). ``epic.models.load_official(family, path, config=None)`` converts an official checkpoint."""
from .registry import load_official  # noqa: F401
