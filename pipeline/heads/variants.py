"""The named STRM variants and the heads' option defaults: plain data, importable without torch (a
command's --help lists them).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

# Which blocks each named variant uses (the paper's Tables 1, 3 and its TRX baseline). "attention"
# is PLE's self-attention block, "mixer" FLE's MLP-mixer; the Table 4 swaps override `ple`/`fle`.
# "joint": the number of Jnt-ST layers (jnt.py) that replace PLE and FLE, None for none.
VARIANTS: MappingProxyType[str, dict[str, Any]] = MappingProxyType(
    {
        "strm": {"ple": "attention", "fle": "mixer", "joint": None, "cardinalities": (2,), "qc": True},
        "trm": {"ple": None, "fle": None, "joint": None, "cardinalities": (2,), "qc": False},
        "ple-trm": {"ple": "attention", "fle": None, "joint": None, "cardinalities": (2,), "qc": False},
        "fle-trm": {"ple": None, "fle": "mixer", "joint": None, "cardinalities": (2,), "qc": False},
        "ple-fle-trm": {"ple": "attention", "fle": "mixer", "joint": None, "cardinalities": (2,), "qc": False},
        "jnt-st-1": {"ple": None, "fle": None, "joint": 1, "cardinalities": (2,), "qc": False},
        "jnt-st-2": {"ple": None, "fle": None, "joint": 2, "cardinalities": (2,), "qc": False},
        "trx": {"ple": None, "fle": None, "joint": None, "cardinalities": (2, 3), "qc": False},
    }
)
ENRICHMENTS = ("attention", "mixer", None)

# Option defaults shared by every variant; None widths mean D/2 (psi, QC).
DEFAULT_OPTIONS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "frames": 8,
        "patches": 16,
        "trm_dim": 1152,
        "psi_dim": None,
        "qc_dim": None,
        "lambda_qc": 0.1,
        "scaled_attention": False,
        "gamma_zero": False,
        "tuple_keep": 1.0,
        "dropout": 0.1,
    }
)
