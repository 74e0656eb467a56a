"""DCA's prefill on the native kernel's key-range entry (``rope_extension.dca_prefill_native``)
equals its PyTorch path past the chunk: greedy tokens identical and prompt log-probabilities
close (float32, an int8 pool, one prefill and chunked prefill); in bfloat16 it is as close to
float32 as the PyTorch bf16 path is."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams, kernels
from slimlm.model import rope_extension
from slimlm.model.hub import load

DCA = {"chunk_size": 64, "local_window": 8}  # chunks of 56 tokens; the tiny model is trained to 256


@pytest.fixture(scope="module")
def d64(tmp_path_factory):
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("d64")
    make_hf_model(path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # d = 64
    lib = kernels.load("paged_prefill")
    if lib is None or not lib.slimlm_prefill_supported(64, 0):
        pytest.skip("no native prefill kernel here: DCA runs on its PyTorch path only")
    return path


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 380, (n,), generator=g).tolist() for n in (130, 61, 300)]  # 3, 2, 6 DCA chunks


def run(path, dtype="float32", **kw):
    kw.setdefault("rope_extension_args", DCA)
    llm = LLM(load(path, dtype=dtype), kv_cache_bytes="8M", block_size=8, rope_extension="dca", **kw)
    ps = prompts()
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0), use_tqdm=False)
    lps = torch.tensor([lp[t] for o, p in zip(outs, ps) for lp, t in zip(o.prompt_logprobs[1:], p[1:])])
    return llm, [o.outputs[0].token_ids for o in outs], lps


def counting(monkeypatch) -> list:
    calls: list = []
    real = rope_extension.dca_prefill_native
    monkeypatch.setattr(rope_extension, "dca_prefill_native", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("kw", [{"max_num_batched_tokens": 2048}, {"max_num_batched_tokens": 37},
                                {"max_num_batched_tokens": 64, "kv_cache_dtype": "int8"},
                                {"max_num_batched_tokens": 37, "rope_extension_args": {**DCA, "cross_scale": 1.3}},
                                {"max_num_batched_tokens": 37, "rope_extension_args": {**DCA, "logit_scale": "auto",
                                                                                       "context": 1024}},
                                {"max_num_batched_tokens": 64, "rope_extension_args": {**DCA, "logit_scale": "yarn",
                                                                                       "context": 1024}}])
def test_native_dca_equals_the_pytorch_path(d64, monkeypatch, kw):
    llm0, tok0, lp0 = run(d64, native_kernels=False, **kw)
    assert llm0.engine.runner.paths.dca_native is None
    calls = counting(monkeypatch)
    llm1, tok1, lp1 = run(d64, **kw)
    assert llm1.engine.runner.paths.dca_native is not None and calls  # the kernel served the chunks
    assert tok1 == tok0
    assert torch.allclose(lp1, lp0, atol=1e-4), float((lp1 - lp0).abs().max())


def test_native_dca_bf16_loses_no_quality(d64, monkeypatch):
    lib = kernels.load("paged_prefill")
    if not lib.slimlm_prefill_supported(64, 1):
        pytest.skip("no AVX512-BF16: the bf16 native path is not built here")
    kw = {"max_num_batched_tokens": 64}
    _, _, exact = run(d64, "float32", native_kernels=False, **kw)
    _, _, pytorch_bf16 = run(d64, "bfloat16", native_kernels=False, **kw)
    calls = counting(monkeypatch)
    _, _, native_bf16 = run(d64, "bfloat16", **kw)
    assert calls
    err_native, err_pytorch = (native_bf16 - exact).abs().mean(), (pytorch_bf16 - exact).abs().mean()
    print(f"mean |logprob - fp32|: native bf16 {err_native:.5f}, PyTorch bf16 {err_pytorch:.5f}")
    assert err_native <= 1.25 * err_pytorch + 1e-3, (err_native, err_pytorch)


def test_dca_ranges_split_each_query_chunk():
    # c = 56: rows at 50..129 are DCA chunks 0 (50..55), 1 (56..111) and 2 (112..129)
    got = rope_extension.dca_ranges(50, 80, 56)
    assert got == [(0, 6, [("intra", 0, 56, True)]),
                   (6, 62, [("succ", 0, 56, False), ("intra", 56, 112, True)]),
                   (62, 80, [("inter", 0, 56, False), ("succ", 56, 112, False), ("intra", 112, 130, True)])]
