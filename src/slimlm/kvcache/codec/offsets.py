"""Static key offsets: one vector per (storage, KV head) subtracted from every key before it is
quantized (int4 keys; issue 11).

A head's keys are not centred: a few channels (the slowly rotating RoPE pairs) carry a large
offset shared by every token, and a per-token quantizer spends its range on it. Subtracting a
fixed vector mu from every stored key changes each score of a query by the same amount,
q . (k - mu) = q . k - q . mu, and softmax is invariant to a constant per query: attention is
exactly unchanged, with no byte stored and no work at read time. So the native kernels read the
stored rows as they are (the query is not touched); the PyTorch readers (gather path, KV
policies) get mu added back by the codec's ``read`` and see the model's own keys. A reader that
mixes stored keys with keys it rebuilt itself in one softmax (the sparse decode path) passes the
rebuilt ones through :meth:`KVCodec.keys_to_storage`, which subtracts mu too.

mu is the mean key of each (layer, KV head) over the tokens of ``CALIBRATION_TEXT`` (a short
English paragraph written for this module), measured once when the engine starts: one forward of
about 300 tokens. A storage shared by several layers (MiniCache) takes its layers' mean. The
static mean is taken after RoPE: the slowly rotating pairs, which carry the offset, barely
move over a context; the fast ones average to zero and are left alone. Calibrating per-channel
*scales* as well (SmoothQuant-style smoothing) measured worse, see
``docs/results/raw/kv_int4_study.py`` and docs/techniques.md.
"""

from __future__ import annotations

import torch

from slimlm.model.attention import attention

CALIBRATION_TEXT = (
    "The harbour town wakes before the sun. Fishing boats leave in a line past the old stone "
    "lighthouse, and the bakery on the corner opens its shutters while the street is still wet "
    "from the night's rain. By seven the market square is full: farmers unload crates of "
    "apples, cabbages and onions, a man sells knives from a folding table, and children run "
    "between the stalls with bread still warm in paper bags. The town council meets on the "
    "first Monday of each month in a room above the post office. Last spring it argued for "
    "three hours about whether to repair the sea wall or to build a new school, and in the end "
    "it voted to do both, paying for the wall with a loan and for the school with a small tax "
    "on summer visitors. Not everyone agreed. The owner of the largest hotel wrote a long "
    "letter to the newspaper, saying that tourists would simply go elsewhere, while the "
    "teachers pointed out that forty children were sharing a building meant for twenty. "
    "Engineers who inspected the wall found that the winter storms had washed away much of "
    "the sand beneath it, and they warned that a single high tide could break it open. Work "
    "began in June. A crane arrived on a barge, divers checked the foundations, and for two "
    "months the sound of hammering carried across the water. When the school opened in "
    "September, the mayor gave a short speech, the children planted a row of trees along the "
    "fence, and the hotel, as it turned out, had its busiest year in a decade.\n\n"
    "def mean(values):\n    total = 0.0\n    for v in values:\n        total += v\n"
    "    return total / len(values) if values else 0.0\n"
)


class _Record:
    """A dense causal attention backend that sums every layer's keys as it runs."""

    def __init__(self, scale: float):
        self.scale, self.sums, self.vsums, self.n = scale, {}, {}, 0

    def attend(self, layer, q, k, v, q_rows=None):
        self.sums[layer] = self.sums.get(layer, 0) + k[0].double().sum(1)  # (Hkv, d)
        self.vsums[layer] = self.vsums.get(layer, 0) + v[0].double().sum(1)
        if layer == 0:
            self.n += k.shape[2]
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()[None, None]
        return attention(q, k, v, mask, self.scale)


def calibration_ids(tokenizer, vocab_size: int) -> list[int]:
    """The calibration text's token ids (seeded random ids when there is no tokenizer)."""
    if tokenizer is not None:
        ids = [i for i in tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False) if i < vocab_size]
        if ids:
            return ids
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (256,), generator=g).tolist()


@torch.no_grad()
def kv_means(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the mean post-RoPE key and the mean value (Hkv, d) float32 over ``ids`` (one
    dense forward)."""
    rec = _Record(model.attn_scale)
    dev = next(model.parameters()).device
    model(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None], rec)
    n = range(len(rec.sums))
    return [(rec.sums[i] / rec.n).float() for i in n], [(rec.vsums[i] / rec.n).float() for i in n]


def key_means(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the mean post-RoPE key (Hkv, d) float32 over ``ids`` (one dense forward)."""
    return kv_means(model, ids)[0]


def apply(cache, model, tokenizer=None) -> bool:
    """Give the cache's key codec (and value codec) its per-storage offsets if it asks for them
    (True if either did). Value offsets are exact too: attention weights sum to 1, so
    sum_i p_i (v_i - mu) + mu = sum_i p_i v_i; the codec adds mu back in ``read``."""
    codec, vcodec = cache.codec, cache.vcodec
    wants_v = getattr(vcodec, "wants_value_offsets", False)
    if not codec.wants_key_offsets and not wants_v:
        return False
    kmeans, vmeans = kv_means(model, calibration_ids(tokenizer, model.cfg.vocab_size))
    layers = cache.spec.layers
    want = (cache.spec.num_kv_heads, cache.spec.head_dim)
    if len(kmeans) != len(layers) or any(tuple(mu.shape) != want for mu in kmeans + vmeans):
        return False  # rows shaped unlike the cache (no offsets: exact either way, only less precise)
    for st in range(cache.spec.num_storages):
        for c, means, main, ret, on in ((codec, kmeans, cache.k, cache.rk, codec.wants_key_offsets),
                                        (vcodec, vmeans, cache.v, cache.rv, wants_v)):
            if not on:
                continue
            mu = torch.stack([means[i] for i, ls in enumerate(layers) if ls.storage == st]).mean(0)
            c.set_offset(main[st], mu)
            if st in ret:  # a merged storage's retention rows hold rows of the same layers
                c.set_offset(ret[st], mu)
    return True
