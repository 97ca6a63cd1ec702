from .config import PromptConfig
from .model import attach

__all__ = ["PromptConfig", "attach"]
