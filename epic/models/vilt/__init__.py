"""ViLT family: configuration, model and the official-checkpoint converter beside it (timm / HF layout)."""
from .configuration_vilt import ViLTConfig, vilt_config_from_dict
from .convert_vilt import load_official_vilt, to_official_state_dict, vilt_config_from_official
from .modeling_vilt import ViLT, sample_patches

__all__ = ["ViLT", "ViLTConfig", "vilt_config_from_dict", "load_official_vilt", "to_official_state_dict",
           "vilt_config_from_official", "sample_patches"]
