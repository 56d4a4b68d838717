"""Training the heads: the one episodic loop, fed cached views (train) or decoded clips through the
backbone (finetune), run folders and their resume rules, and one loader for every checkpoint kind.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
