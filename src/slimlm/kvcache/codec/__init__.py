"""KV codecs: the storage format of the KV cache (``kv_cache_dtype``). One file per codec.

Importing this package registers every codec in ``KV_CODECS``.
"""

from slimlm.kvcache.codec.base import KV_CODECS, KVCodec
from slimlm.kvcache.codec import int4, int8, lowbit, plain  # noqa: F401  (register the codecs)

__all__ = ["KV_CODECS", "KVCodec"]
