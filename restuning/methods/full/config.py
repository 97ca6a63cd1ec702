from dataclasses import dataclass

from ...config import MethodConfig


@dataclass
class FullConfig(MethodConfig):
    method = "full"
