"""The int4 codec's rotation (QuaRot's idea, ``kvcache/codec/rotation.py``): orthogonal and fixed,
a round trip equal to an independent rotate-quantize-rotate-back reference, q . k unchanged when
the query is rotated alike, less error than the unrotated codec on keys with outlier channels,
and every reader consistent: the engine with H2O (attention mass from the native decode kernel
on rotated queries) and MiniCache equal dense references of the same method and quantization."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.kvcache.codec import KV_CODECS
from slimlm.kvcache.codec import int4 as int4_mod
from slimlm.kvcache.codec.rotation import hadamard, random_orthogonal, rotation
from slimlm.kvcache.policy import KV_POLICIES
from slimlm.model.hub import load
from slimlm.model.rope import apply_rope
from tests.engine.test_engine import make_prompts
from tests.kvcache.test_codecs import engine_offsets, roundtrip
from tests.kvcache.test_h2o import DenseH2O, assert_reference_follows, engine_chunks


@pytest.mark.parametrize("d", [16, 64, 48])
def test_rotation_is_orthogonal_and_fixed(d):
    r = rotation(d, "cpu")
    torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-6, rtol=0)
    if d & (d - 1) == 0:  # Walsh-Hadamard: every entry +-1/sqrt(d)
        assert torch.equal(r, hadamard(d)) and torch.allclose(r.abs(), torch.full((d, d), d**-0.5))
    else:
        assert torch.equal(r, random_orthogonal(d)) and torch.equal(random_orthogonal(d), random_orthogonal(d))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


def reference_int4(x: torch.Tensor, group: int) -> torch.Tensor:
    """Rotate by the Hadamard matrix, quantize each group to 16 levels (fp16 scale and minimum),
    de-quantize and rotate back: written independently of the codec, float64 rotation."""
    d = x.shape[-1]
    h = hadamard(d).double()
    xr = (x.double() @ h).float()
    g = xr.view(*x.shape[:-1], d // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-8).half().float()
    m = lo.half().float()
    y = (((g - m) / s).round().clamp(0, 15) * s + m).view_as(xr)
    return (y.double() @ h.T).float()


@pytest.mark.parametrize("d,group", [(64, 16), (16, 16), (64, 32)])
def test_int4_round_trip_equals_rotated_reference(d, group, monkeypatch):
    torch.manual_seed(3)
    monkeypatch.setattr(int4_mod, "GROUPS", {"k": group, "v": 32})  # keys in 16 by default
    codec = KV_CODECS.get("int4")(torch.float32, d)
    assert codec.rotates and codec.group == group
    x = torch.randn(29, 3, d) * torch.rand(29, 3, 1) * 3
    torch.testing.assert_close(roundtrip(codec, x), reference_int4(x, group), atol=2e-6, rtol=0)


def test_keys_are_rotated_values_are_not(monkeypatch):
    """int4 rotates the key pool only (values measured slightly worse rotated); the knob
    ``ROTATE`` selects the pools, and a value codec without rotation is the plain int4 grid."""
    torch.manual_seed(6)
    k, v = (KV_CODECS.get("int4")(torch.float32, 64, role) for role in ("k", "v"))
    assert k.rotates and not v.rotates
    x = torch.randn(16, 2, 64)
    g = x.view(16, 2, 2, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s, m = ((hi - lo) / 15).half().float(), lo.half().float()
    torch.testing.assert_close(roundtrip(v, x), (((g - m) / s).round().clamp(0, 15) * s + m).view_as(x),
                               atol=1e-6, rtol=0)
    monkeypatch.setattr(int4_mod, "ROTATE", ("k", "v"))
    assert KV_CODECS.get("int4")(torch.float32, 64, "v").rotates
    with pytest.raises(ValueError, match="role"):
        KV_CODECS.get("int4")(torch.float32, 64, "q")


def test_scores_are_invariant_under_the_rotation():
    """q . k from the model's space (read back) equals the rotated query against the stored,
    rotated rows: what the native decode kernel computes."""
    torch.manual_seed(4)
    codec = KV_CODECS.get("int4")(torch.float32, 64)
    k, q = torch.randn(16, 2, 64), torch.randn(5, 2, 64)
    parts = codec.allocate(2, 8, 2, "cpu")
    codec.write(parts, torch.arange(16), k)
    back = codec.read(parts, torch.arange(2)).reshape(16, 2, 64)
    stored = codec.to_storage(back)  # the de-quantized stored rows, x @ R
    want = torch.einsum("qhd,khd->hqk", q, back)
    got = torch.einsum("qhd,khd->hqk", codec.to_storage(q), stored)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codec.from_storage(codec.to_storage(q)), q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("group,ratio", [(32, 0.6), (16, 0.8)])  # measured 0.49 and 0.68
def test_rotation_cuts_the_error_of_keys_with_outlier_channels(monkeypatch, group, ratio):
    """Keys whose few channels are 20x the others (what RoPE's low-frequency pairs look like):
    the rotated codec's error is a fraction of the unrotated one's, same bytes (smaller groups
    already isolate outliers better, so the rotation gains less there)."""
    torch.manual_seed(5)
    monkeypatch.setattr(int4_mod, "GROUPS", {"k": group, "v": 32})
    x = torch.randn(256, 2, 64)
    x[..., [3, 35, 60]] *= 20
    rot = KV_CODECS.get("int4")(torch.float32, 64)
    monkeypatch.setattr(int4_mod, "ROTATE", ())
    plain = KV_CODECS.get("int4")(torch.float32, 64)
    assert not plain.rotates and plain.bytes_per_row(2) == rot.bytes_per_row(2)
    e_rot = (roundtrip(rot, x) - x).norm() / x.norm()
    e_plain = (roundtrip(plain, x) - x).norm() / x.norm()
    assert e_rot < ratio * e_plain


class QuantDenseH2O(DenseH2O):
    """DenseH2O whose stored keys and values pass through a codec (the same quantization)."""

    def __init__(self, lm, policy, block_size, prompt_len, codecs):
        super().__init__(lm, policy, block_size, prompt_len)
        self.codecs = codecs  # keys', values'
        self.mu = engine_offsets(lm) if codecs[0].wants_key_offsets else None  # keys' offsets, as the engine's

    def store(self, k, v):
        rt = lambda c, x, mu=None: roundtrip(c, x.transpose(0, 1), offset=mu).transpose(0, 1)  # noqa: E731
        return rt(self.codecs[0], k, self.mu[self.layer] if self.mu is not None else None), rt(self.codecs[1], v)


@pytest.fixture(scope="module")
def head64(tmp_path_factory):
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("head64")
    make_hf_model(path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    return load(path)


@pytest.mark.parametrize("extra", [{}, {"window": 16, "pool": 3}])
@pytest.mark.parametrize("native", [True, False])
def test_h2o_with_rotated_int4_equals_dense_h2o(head64, native, extra):
    """Head size 64: decode reads the rotated int4 pool in place (rotated query, rotated-back
    output) and accumulates H2O's attention mass there; the token choices and the greedy output
    equal a dense H2O over the same quantized keys and values, fed the same chunks."""
    prompts = [(p * 3)[:120] for p in make_prompts(3, seed=21)]
    args = {"budget": 0.3, "min_tokens": 16, **extra}  # extra: SnapKV's window scores, read from the int4 pool
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(head64, kv_policy="h2o", kv_policy_args=args, kv_cache_dtype="int4", block_size=8,
              max_num_batched_tokens=32, native_kernels=native)
    assert llm.engine.cache.codec.rotates and not llm.engine.cache.vcodec.rotates
    assert (llm.engine.runner.paths.native_decode is not None) == native
    outs, log, _ = engine_chunks(llm, prompts, params)
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    codecs = [KV_CODECS.get("int4")(torch.float32, 64, role) for role in ("k", "v")]
    for prompt, out, sid in zip(prompts, outs, sorted(log)):
        ref = QuantDenseH2O(head64, KV_POLICIES.get("h2o")(**args), 8, len(prompt), codecs)
        assert_reference_follows(ref, prompt, log[sid], out)
