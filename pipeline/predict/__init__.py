"""A trained model on a person's own clips: a support folder or saved index, query clips and long
recordings in windows, live streams as they play, probabilities calibrated on the support, and unknown
below a threshold.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
