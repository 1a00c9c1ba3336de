"""lpcli: precision analysis for training deep neural networks in limited precision.

Every CLI command has a library twin::

    from lpcli import analyze, recommend, train_check   # analyze / recommend / train-check
    from lpcli import StatsCollector                     # stats from your own training loop
    from lpcli import KahanSGD, quantize, parse_format   # the optimizer and the formats
    from lpcli import load_plan, Simulation              # a plan in your own training loop
"""

__version__ = "0.1.0"

from .check import train_check  # noqa: E402
from .formats import parse_format
from .kernels import quantize  # noqa: E402
from .optim import KahanAdam, KahanAdamW, KahanSGD  # noqa: E402
from .plan import Plan  # noqa: E402
from .recipe import load_recipe  # noqa: E402
from .recommend import Rules, recommend  # noqa: E402
from .simulation import Simulation, load_plan  # noqa: E402
from .stats import StatsCollector, analyze  # noqa: E402

__all__ = ["KahanAdam", "KahanAdamW", "KahanSGD", "Plan", "Rules", "Simulation", "StatsCollector", "analyze",
           "load_plan", "load_recipe", "parse_format", "quantize", "recommend", "train_check", "__version__"]
