from .config import ResTuningConfig
from .model import attach

__all__ = ["ResTuningConfig", "attach"]
