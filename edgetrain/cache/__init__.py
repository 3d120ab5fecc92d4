"""On-disk cache of a frozen module's outputs, read back as shuffled mini-batches.

After module k is trained and frozen, its outputs on the train and test sets are written here
(`write_cache` / `CacheWriter`), and module k+1 trains on them (`FeatureCache.batches`) without
the cache ever being loaded or memory-mapped whole.
"""

from edgetrain.cache.manifest import CACHE_DTYPES, CacheCorruptError, CacheManifest
from edgetrain.cache.reader import FeatureCache, cache_is_valid
from edgetrain.cache.writer import CacheWriter, write_cache

__all__ = [
    "CACHE_DTYPES",
    "CacheCorruptError",
    "CacheManifest",
    "CacheWriter",
    "FeatureCache",
    "cache_is_valid",
    "write_cache",
]
