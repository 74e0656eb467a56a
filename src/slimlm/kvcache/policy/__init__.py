"""KV-cache policies: which tokens' KV each sequence keeps. One file per policy.

Importing this package registers every policy in ``KV_POLICIES``.
"""

from slimlm.kvcache.policy.base import KV_POLICIES, AttentionSpan, KVPolicy
from slimlm.kvcache.policy import h2o, minicache, shadowkv, sink, squeezed  # noqa: F401  (registers the policies)

__all__ = ["KV_POLICIES", "AttentionSpan", "KVPolicy"]
