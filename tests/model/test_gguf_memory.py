"""The memory-lean GGUF loading path (model/gguf_file.py, weights.meta_skeleton): the same bytes,
tensors and greedy tokens as the ``gguf`` package's reader and a ``torch.device("meta")`` build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimlm.errors import ModelLoadError
from slimlm.model.gguf import _hf_name, _unpermute, write_gguf
from slimlm.model.gguf_file import GGUFFile
from slimlm.model.hub import load
from slimlm.model.weights import meta_skeleton


@pytest.fixture(scope="module")
def tiny_q41(tmp_path_factory, tiny_llama_dir):
    src = load(tiny_llama_dir)
    return write_gguf(src.model, src.tokenizer, tmp_path_factory.mktemp("gguf") / "m.gguf", "Q4_1")


def test_header_and_tensor_bytes_equal_the_gguf_readers(tiny_q41):
    import gguf

    ref = gguf.GGUFReader(str(tiny_q41))
    f = GGUFFile(tiny_q41)
    assert set(f.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for k, field in ref.fields.items():
        if not k.startswith("GGUF."):
            assert f.fields[k] == field.contents(), k
    assert [t.name for t in f.tensors] == [t.name for t in ref.tensors]
    kinds = set()
    for t, r in zip(f.tensors, ref.tensors):
        assert t.type_name == r.tensor_type.name and t.n_bytes == r.n_bytes and t.offset == r.data_offset
        assert t.shape == tuple(int(x) for x in reversed(r.shape.tolist()))
        got = f.read(t)
        assert got.dtype == r.data.dtype and np.array_equal(got, r.data), t.name
        if len(t.shape) == 2:
            assert np.array_equal(f.read(t, slice(1, 3)), r.data[1:3])
        kinds.add(t.type_name)
    assert {"Q4_1", "F32"} <= kinds


def test_loaded_model_and_greedy_tokens_equal_the_reference_path(tiny_q41):
    """The model built as the loader did before (GGUFReader's tensors, a ``torch.device("meta")``
    skeleton) and the one ``load`` builds now: every tensor bit for bit, the same greedy tokens."""
    import gguf

    from slimlm.engine.llm import LLM
    from slimlm import SamplingParams
    from slimlm.model import quant
    from slimlm.model.hub import LoadedModel
    from slimlm.model.quant.gguf_packed import pack_gguf, permute_rows
    from slimlm.model.quant.load import PackOnLoad
    from slimlm.model.rope import RotaryEmbedding
    from slimlm.model.transformer import CausalLM

    new = load(tiny_q41, weights="gguf")
    cfg = new.model.cfg
    pack = PackOnLoad("gguf")
    state = {}
    for t in gguf.GGUFReader(str(tiny_q41)).tensors:
        name, shape = _hf_name(t.name), tuple(int(x) for x in reversed(t.shape.tolist()))
        heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
        rotary = ".q_proj." in name or ".k_proj." in name
        if t.tensor_type.name == "F32":
            w = torch.from_numpy(np.array(t.data, np.float32).reshape(shape))
            state[name] = _unpermute(w, heads) if rotary else w
            continue
        p = pack_gguf(t.data, t.tensor_type.name, *shape)
        state.update(pack.add(name.rpartition(".")[0], permute_rows(p, lambda x: _unpermute(x, heads)) if rotary else p))
    expected = new.model.state_dict()
    missing = set(expected) - set(state)  # a tied head is the embedding's tensors
    assert set(state) <= set(expected) and missing <= ({"lm_head.qweight", "lm_head.scales"} if cfg.tie_word_embeddings
                                                       else set())
    for k, v in state.items():
        assert v.dtype == expected[k].dtype and torch.equal(v, expected[k]), k

    with torch.device("meta"):
        ref = CausalLM(cfg)
        quant.prepare(ref, pack.modules)
    ref.load_state_dict(state, strict=False, assign=True)
    quant.finish(ref, torch.float32)
    ref.rotary = RotaryEmbedding(cfg)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5]]
    got = [o.outputs[0].token_ids for o in LLM(new).generate(prompts, sp, use_tqdm=False)]
    old = LoadedModel(ref.eval(), new.tokenizer, tiny_q41, new.generation_config, weights="gguf")
    want = [o.outputs[0].token_ids for o in LLM(old).generate(prompts, sp, use_tqdm=False)]
    assert got == want and all(len(g) == 8 for g in got)


def test_truncated_or_foreign_header_is_one_named_error(tmp_path, tiny_q41):
    data = tiny_q41.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(ModelLoadError, match="corrupted or truncated GGUF file .*runs past the end"):
        GGUFFile(cut)
    cut.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + data[8:])
    with pytest.raises(ModelLoadError, match="version 7 is not supported"):
        GGUFFile(cut)
    cut.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ModelLoadError, match="no GGUF magic"):
        GGUFFile(cut)
    f = GGUFFile(tiny_q41)
    cut.write_bytes(data[: f.tensors[-1].offset + 1])  # the last tensor's data cut short
    short = GGUFFile(cut)
    with pytest.raises(ModelLoadError, match=f"tensor {f.tensors[-1].name} runs past the end"):
        short.read(short.tensors[-1])


def test_meta_skeleton_builds_the_same_modules_and_computes_nothing_else(tiny_llama_dir, monkeypatch):
    from slimlm.model.rope import RotaryEmbedding
    from slimlm.model.transformer import CausalLM

    cfg = load(tiny_llama_dir).model.cfg
    with torch.device("meta"):
        ref = CausalLM(cfg)
    calls = []
    for f in ("_no_grad_normal_", "_no_grad_uniform_"):  # what init.normal_ / uniform_ run when not skipped
        monkeypatch.setattr(nn.init, f, lambda *a, _f=getattr(nn.init, f), **k: calls.append(1) or _f(*a, **k))
    with torch.device("meta"):
        CausalLM(cfg)
    assert calls, "the probe must see initializers run on a plain meta build"
    calls.clear()
    with meta_skeleton():
        got = CausalLM(cfg)
        cpu = torch.zeros(3, device="cpu").add_(1)  # in place on a real tensor: still done
    assert calls == [] and torch.equal(cpu, torch.ones(3))
    a = {k: (v.shape, v.dtype, v.device.type) for k, v in ref.state_dict().items()}
    b = {k: (v.shape, v.dtype, v.device.type) for k, v in got.state_dict().items()}
    assert a == b and all(d == "meta" for _, _, d in b.values())
    assert torch.equal(got.rotary.inv_freq, RotaryEmbedding(cfg).inv_freq)  # computed on the CPU


@pytest.mark.parametrize("weights, name", [("int8", "model.embed_tokens"), ("int4", "model.layers.0.mlp.up_proj")])
def test_packing_in_row_blocks_equals_packing_at_once(monkeypatch, weights, name):
    from slimlm.model.quant import model as qmodel

    w = torch.randn(21, 64)
    whole = qmodel.quantize_weight(name, w, weights, None)  # 21 rows <= CHUNK_ROWS: one block
    monkeypatch.setattr(qmodel, "CHUNK_ROWS", 8)  # 8 + 8 + 5 rows
    blocks = qmodel.quantize_weight(name, w, weights, None)
    assert type(blocks) is type(whole) and blocks.group_size == whole.group_size
    for k, t in whole.tensors().items():
        assert torch.equal(blocks.tensors()[k], t), k
