from .checkpoint import (
    ImportReport,
    load_authors_checkpoint,
    load_heads,
    save_heads,
)
from .embedding import HeadsOutput, VideoEmbedding
from .model import STRMHeads, build_heads
from .variants import VARIANTS

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
