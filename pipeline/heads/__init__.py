"""STRM heads: PLE, FLE, TRM and QC, assembled by variant, plus checkpoint import and the project format.

Pure torch: no files are read here except by the checkpoint functions, which take paths or dicts.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
