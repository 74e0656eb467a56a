"""KV-cache policies: which tokens' KV each sequence keeps. One file per policy.

Importing this package registers every policy in ``KV_POLICIES``.
"""

from slimlm.kvcache.policy.base import KV_POLICIES, AttentionSpan, KVPolicy
from slimlm.kvcache.policy import sink  # noqa: F401  (registers "sink")

__all__ = ["KV_POLICIES", "AttentionSpan", "KVPolicy"]
