from .backbones import Backbone, get_backbone, patch_features
from .cache import CacheWriter, FeatureCache, open_cache
from .copies import export_hdf5, write_random_cache
from .extract import ExtractSettings, RunOptions
from .presets import OFFLINE_DEFAULT, PRESETS
from .readers import LOADINGS, CacheBusy, CacheError, SplitFeatures, SplitReader
from .recipe import FeatureRecipe
from .weights import WeightsUnavailable, file_sha256

__all__ = [
    "Backbone",
    "CacheBusy",
    "CacheError",
    "CacheWriter",
    "ExtractSettings",
    "FeatureCache",
    "FeatureRecipe",
    "LOADINGS",
    "OFFLINE_DEFAULT",
    "PRESETS",
    "RunOptions",
    "SplitFeatures",
    "SplitReader",
    "WeightsUnavailable",
    "export_hdf5",
    "file_sha256",
    "get_backbone",
    "open_cache",
    "patch_features",
    "write_random_cache",
]
