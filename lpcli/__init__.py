"""lpcli: precision analysis for training deep neural networks in limited precision."""

__version__ = "0.1.0"

from .formats import parse_format, quantize  # noqa: E402
from .optim import KahanSGD  # noqa: E402

__all__ = ["KahanSGD", "parse_format", "quantize", "__version__"]
