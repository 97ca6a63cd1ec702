from .config import BypassConfig
from .model import attach, bypass_outputs

__all__ = ["BypassConfig", "attach", "bypass_outputs"]
