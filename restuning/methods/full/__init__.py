from .config import FullConfig
from .model import FullAttached, attach

__all__ = ["FullAttached", "FullConfig", "attach"]
