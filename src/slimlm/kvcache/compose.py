"""Which KV methods compose, decided at engine start-up: a combination that cannot work is
refused with one line, never silently ignored.

Supported (tested in tests/engine/test_kv_policy.py): every ``kv_cache_dtype`` (plain, int8,
int4) with every KV policy (sink, h2o, minicache, squeezed, shadowkv; int4 + h2o, its window
scores included, against a dense reference in tests/kvcache/test_codec_rotation.py, and its bytes
held, codec x budget, in tests/kvcache/test_h2o.py); one ``kv_policy`` per engine (h2o and
minicache do not stack); prefix caching and
preemption with all of them (token policies switch prefix caching off: a compacted block no
longer holds its prefix; query policies share their prefix summaries through it).
Refused: token policies on sliding-window models (checked in the engine), merged layers
(minicache) with speculative decoding (a rejected draft's merged rows cannot be unmerged) or
with a single-layer model, query policies (squeezed, shadowkv) with speculative decoding (its
verification rows are not decode rows, so they would attend densely: the method would silently
not apply).
"""

from __future__ import annotations

from slimlm.errors import SlimLMError
from slimlm.kvcache.spec import KVCacheSpec


def check_composition(spec: KVCacheSpec, kv_policy: str | None, speculative: str | None) -> None:
    from slimlm.kvcache.policy import KV_POLICIES

    if kv_policy and speculative and getattr(KV_POLICIES.get(kv_policy), "sparse_decode", False):
        raise SlimLMError(f"kv_policy={kv_policy!r} selects keys per decode query, which speculative decoding "
                          f"({speculative!r}) verifies in multi-token steps; use one or the other")
    if spec.merge is not None and speculative:
        raise SlimLMError(f"kv_policy={kv_policy!r} merges layers' KV, which speculative decoding "
                          f"({speculative!r}) cannot roll back; use one or the other")
