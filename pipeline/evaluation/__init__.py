"""Scoring frozen heads on seeded tasks: per-video embeddings once, batched exact relating, accuracy
with 95% intervals and paired comparison, post-hoc and trained unknown scores measured on open-set tasks
(queries of actions the support does not hold), and FLOP counts.
"""

import lazy_loader

# The package's names (listed in __init__.pyi) load on first use, so importing a light submodule, or
# `strm --help`, does not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
