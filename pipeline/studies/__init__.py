"""What the stages run on top of training and evaluation: evaluation runs of a checkpoint, ablation
grids, activation maps, the figures and words of a report, and the demo that runs them all.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
