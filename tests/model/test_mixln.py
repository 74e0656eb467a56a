"""Mix-LN (Post-LN in the first layers, Pre-LN after): forward vs a hand-written stack, save/load,
the serving engine, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.reference import ReferenceDecoder
from slimlm.errors import SlimLMError
from slimlm.model.config import ModelConfig
from slimlm.model.hub import load
from slimlm.model.transformer import CausalLM
from slimlm.model.weights import save_model_dir


@pytest.fixture(scope="module")
def mix_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama's weights in a 4-layer Mix-LN model: layers 0-1 Post-LN, 2-3 Pre-LN."""
    base = load(tiny_llama_dir)
    cfg = base.model.cfg.replace(num_layers=4, norm_placement="mix", post_ln_fraction=0.5)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("mixln")
    save_model_dir(model, path, base.tokenizer)
    return path


def hand_written(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Post-LN: x = LN(x + f(x)); Pre-LN: x = x + f(LN(x)), written out from the submodules."""
    pos = torch.arange(ids.shape[1])[None]
    attn = model.dense_attention(pos)
    h = model.model.embed_tokens(ids)
    cos, sin = model.rotary(pos, h.dtype)
    for i, L in enumerate(model.model.layers):
        if i < 2:
            h = L.input_layernorm(h + L.self_attn(h, cos, sin, attn))
            h = L.post_attention_layernorm(h + L.mlp(h))
        else:
            h = h + L.self_attn(L.input_layernorm(h), cos, sin, attn)
            h = h + L.mlp(L.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))


def test_mixln_forward_equals_a_hand_written_post_then_pre_stack(mix_dir):
    lm = load(mix_dir)  # also: the config round-trips through config.json
    assert [L.post_ln for L in lm.model.model.layers] == [True, True, False, False]
    assert json.loads((mix_dir / "config.json").read_text())["norm_placement"] == "mix"
    ids = torch.randint(0, lm.model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hand_written(lm.model, ids), atol=0, rtol=0)
        pre = CausalLM(lm.model.cfg.replace(norm_placement="pre"))
        pre.load_state_dict(lm.model.state_dict())
        assert not torch.allclose(pre(ids), lm.model(ids), atol=1e-3)  # the placement matters


def test_the_engine_serves_a_mixln_model_like_the_reference_decoder(mix_dir):
    lm = load(mix_dir)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [5, 6, 7, 20, 21, 22, 23]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    dec = ReferenceDecoder(lm.model, [])
    expected = [[e.token_id for e in dec.stream(p, params)] for p in prompts]
    outs = LLM(lm, max_num_batched_tokens=16, block_size=8).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("kw,msg", [
    (dict(post_ln_fraction=1.5), "post_ln_fraction must be in \\[0, 1\\]; got 1.5"),
    (dict(norm_placement="middle"), "norm_placement must be one of pre, post, mix; got 'middle'"),
])
def test_bad_mixln_settings_are_one_line_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2, num_kv_heads=1, **kw)
    from slimlm.train.config import load_config

    with pytest.raises(SlimLMError, match="model." + msg.split(" must")[0]):
        load_config(None, [f"--model.{k}" for k in kw][:1] + [str(v) for v in kw.values()])


def test_gguf_refuses_a_mixln_model(mix_dir, tmp_path):
    pytest.importorskip("gguf")
    from slimlm.errors import UnsupportedArchitectureError
    from slimlm.model.gguf import write_gguf

    lm = load(mix_dir)
    with pytest.raises(UnsupportedArchitectureError, match="GGUF has no mix-LN layers"):
        write_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf")

