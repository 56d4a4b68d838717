"""Frozen backbone features: the backbone registry and its weights, extraction (decode -> backbone ->
4x4 max pool), and the Zarr cache with its feature recipe, one writer and split readers.
"""

from pipeline.features.backbones import Backbone, get_backbone, patch_features
from pipeline.features.cache import CacheWriter, FeatureCache, open_cache
from pipeline.features.copies import export_hdf5, write_random_cache
from pipeline.features.extract import ExtractSettings, RunOptions
from pipeline.features.presets import PRESETS
from pipeline.features.readers import LOADINGS, CacheBusy, CacheError, SplitFeatures, SplitReader
from pipeline.features.recipe import FeatureRecipe
from pipeline.features.weights import OFFLINE_DEFAULT, WeightsUnavailable, file_sha256

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
