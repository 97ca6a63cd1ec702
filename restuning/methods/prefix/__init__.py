from .config import PrefixConfig
from .model import attach

__all__ = ["PrefixConfig", "attach"]
