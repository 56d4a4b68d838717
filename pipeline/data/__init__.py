"""Videos before any model: manifests (datasets, splits, validation), decoding and the sampling rule
with its views, the embedded synthetic benchmark, and seeded episodes over class labels.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
