"""X-VLM family: configuration, model, official converter (see modeling_xvlm.py)."""
from .configuration_xvlm import XVLMConfig
from .convert_xvlm import load_official_xvlm, to_official_state_dict
from .modeling_xvlm import XVLM

__all__ = ["XVLM", "XVLMConfig", "load_official_xvlm", "to_official_state_dict"]
