"""The feature cache: per-frame CLIP features of both streams, in Zarr or HDF5."""

from .schema import SCHEMA_VERSION, STREAMS, fingerprint, store_key
from .store import CacheError, CacheWriter, FeatureCache, detect_format, stored_fingerprint

__all__ = ["SCHEMA_VERSION", "STREAMS", "CacheError", "CacheWriter", "FeatureCache", "store_key", "detect_format", "fingerprint",
           "stored_fingerprint"]
