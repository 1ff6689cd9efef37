"""METER (Dou et al., CVPR 2022): configuration, model and official-checkpoint converter of one family.

``from epic.models.meter import METER`` (the old module path) keeps working: every public name of
``modeling_meter`` is served from here, imported on first use (PEP 562), so importing the configuration alone
(``epic.models.meter.configuration_meter``, what the shared towers and ``epic.config`` read) builds no model code.
"""
from .configuration_meter import METERConfig  # noqa: F401


def __getattr__(name: str):
    import importlib

    modeling_meter = importlib.import_module(".modeling_meter", __name__)
    try:
        return getattr(modeling_meter, name)
    except AttributeError:
        raise AttributeError(f"module 'epic.models.meter' has no attribute {name!r}") from None
