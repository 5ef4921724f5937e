"""hpa-kernels: Harmonious Parameter Adaptation (Wang et al., arXiv 2511.20158) for PyTorch."""

from . import functional, ops
from .calibration import HessianCollector
from .config import HPAConfig
from .optim import HPAOptimizer

__all__ = ["HPAConfig", "HPAOptimizer", "HessianCollector", "functional", "ops"]
__version__ = "0.1.0"
