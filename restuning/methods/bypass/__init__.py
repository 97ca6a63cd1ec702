from .config import BypassConfig
from .model import attach, bypass_outputs, off_concept

__all__ = ["BypassConfig", "attach", "bypass_outputs", "off_concept"]
