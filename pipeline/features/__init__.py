"""Frozen backbone features: the backbone registry and its weights, extraction (decode -> backbone ->
4x4 max pool) and the Zarr cache with its feature recipe and split readers.
"""

from pipeline.features.backbones import Backbone, get_backbone, patch_features
from pipeline.features.cache import CacheWriter, FeatureCache, FeatureRecipe, open_cache
from pipeline.features.extract import ExtractSettings, RunOptions
from pipeline.features.presets import PRESETS
from pipeline.features.readers import LOADINGS, CacheError, SplitFeatures, SplitReader
from pipeline.features.weights import OFFLINE_DEFAULT, WeightsUnavailable, file_sha256

__all__ = [
    "Backbone",
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
    "file_sha256",
    "get_backbone",
    "open_cache",
    "patch_features",
]
