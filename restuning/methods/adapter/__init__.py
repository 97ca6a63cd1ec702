from .config import AdapterConfig
from .model import attach

__all__ = ["AdapterConfig", "attach"]
