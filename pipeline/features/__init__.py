"""Frozen backbone features: the backbone registry and its weights, extraction (decode -> backbone ->
4x4 max pool), and the Zarr cache with its feature recipe, one writer and split readers.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
