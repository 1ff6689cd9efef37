"""METER (Dou et al., CVPR 2022): configuration, model and official-checkpoint converter of one family.

    configuration_meter.py   METERConfig
    modeling_meter.py        METER (the VLPModel), its init and parameter-group rules
    convert_meter.py         the official checkpoint <-> ours (``load_official_meter``, the registry's converter)

``from epic.models.meter import METER`` (the old module path) keeps working: every name of ``modeling_meter`` and
``convert_meter`` is served from here, imported on first use (PEP 562), so importing the configuration alone
(``epic.models.meter.configuration_meter``, what the shared towers and ``epic.config`` read) builds no model code.
"""
from .configuration_meter import METERConfig  # noqa: F401


def __getattr__(name: str):
    import importlib

    for module in ("modeling_meter", "convert_meter"):
        found = getattr(importlib.import_module(f".{module}", __name__), name, None)
        if found is not None:
            return found
    raise AttributeError(f"module 'epic.models.meter' has no attribute {name!r}")
