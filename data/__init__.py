"""The data helper: the one piece of code the chapters share.

    from data import fetch, DataError
    folder = fetch("wikitext-2")   # Path to a folder with train.raw, valid.raw, test.raw, verified
"""

from data.download import DataError, cache_dir, fetch, is_cached
from data.registry import DATASETS

__all__ = ["DATASETS", "DataError", "cache_dir", "fetch", "is_cached"]
