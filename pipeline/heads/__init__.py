"""STRM heads: PLE, FLE, TRM and QC, assembled by variant, plus checkpoint import and the project format.

Pure torch: no files are read here except by the checkpoint functions, which take paths or dicts.
"""

from pipeline.heads.checkpoint import (
    ImportReport,
    load_authors_checkpoint,
    load_heads,
    save_heads,
)
from pipeline.heads.embedding import HeadsOutput, VideoEmbedding
from pipeline.heads.model import VARIANTS, STRMHeads, build_heads

__all__ = [
    "VARIANTS",
    "HeadsOutput",
    "ImportReport",
    "STRMHeads",
    "VideoEmbedding",
    "build_heads",
    "load_authors_checkpoint",
    "load_heads",
    "save_heads",
]
