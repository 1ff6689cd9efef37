"""ALBEF (salesforce/ALBEF): configuration, model and the converter for its released checkpoints."""
from .configuration_albef import ALBEFConfig
from .convert_albef import load_official_albef, official_albef_config, to_official_state_dict
from .modeling_albef import ALBEF

__all__ = ["ALBEF", "ALBEFConfig", "load_official_albef", "official_albef_config", "to_official_state_dict"]
