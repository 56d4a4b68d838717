"""Where work runs and what survives it: the device and precision chosen once ("auto"), ranks and
collectives with their timeout, crash-isolated workers with their time limit, files fsynced to disk.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
