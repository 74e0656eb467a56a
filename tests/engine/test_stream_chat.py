"""LLM.stream yields deltas (vLLM's DELTA kind) and takes chat messages; ChatSession / the
`slimlm chat` REPL keep a multi-turn history; the default KV pool holds a full-context sequence;
max_tokens past the context is refused with the numbers."""

from __future__ import annotations

import io

import pytest

from slimlm import LLM, SamplingParams
from slimlm.engine.chat import ChatSession, repl
from slimlm.model.hub import load

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(load(tiny_llama_dir), kv_cache_bytes="4M")


def test_stream_yields_deltas_that_join_into_generate(llm):
    full = llm.generate(["The quick brown"], GREEDY, use_tqdm=False)[0].outputs[0]
    parts = list(llm.stream("The quick brown", GREEDY))
    assert len(parts) > 1
    assert "".join(p.outputs[0].text for p in parts) == full.text
    assert [t for p in parts for t in p.outputs[0].token_ids] == full.token_ids
    assert all(len(p.outputs[0].token_ids) <= 1 for p in parts)  # one new token per step, not the text so far
    assert [p.finished for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].outputs[0].finish_reason == "length"


def test_stream_takes_chat_messages(llm):
    msgs = [{"role": "user", "content": "Once upon a time"}]
    want = llm.chat(msgs, GREEDY, use_tqdm=False)[0]
    parts = list(llm.stream(msgs, GREEDY))
    assert "".join(p.outputs[0].text for p in parts) == want.outputs[0].text
    assert parts[0].prompt == want.prompt


def test_stream_stopped_early_frees_the_request(llm):
    for _ in llm.stream("def add(a, b):", GREEDY):
        assert llm.engine.pool.num_used() > 0
        break
    assert not llm.engine.has_unfinished()
    assert llm.engine.pool.num_used() == 0


def test_max_tokens_past_the_context_is_refused(llm):
    with pytest.raises(ValueError, match=r"max_tokens \(300\) = 303 is past the model's context of 256 tokens; "
                                         r"use max_tokens <= 253"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=300), use_tqdm=False)
    with pytest.raises(ValueError, match="context of 256"):
        list(llm.stream([5, 6, 7], SamplingParams(max_tokens=254)))
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=253, temperature=0), use_tqdm=False)


def test_default_pool_holds_a_full_context_sequence(tiny_llama_dir, monkeypatch):
    import slimlm.engine.config as config

    monkeypatch.setattr(config, "_free_share", lambda device: 1)  # a machine with no memory to spare
    llm = LLM(load(tiny_llama_dir))
    assert llm.engine.pool.num_blocks * 16 >= 256 + 1
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=253, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 253


def test_small_pool_error_names_the_flag_and_size(tiny_llama_dir):
    llm = LLM(load(tiny_llama_dir), kv_cache_bytes=4 * 4096)
    with pytest.raises(ValueError, match=r"set kv_cache_bytes to at least \d+K \(--kv-cache-bytes\)"):
        llm.generate([[5] * 100], SamplingParams(max_tokens=100), use_tqdm=False)


def test_sizes():
    from slimlm.engine.config import EngineConfig, format_size, parse_size

    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096 and parse_size("64kb") == 64 << 10
    assert EngineConfig(kv_cache_bytes="1G").kv_cache_bytes == 1 << 30
    for bad in ["", "G", "12Q", "-1G", "0"]:
        with pytest.raises(ValueError, match="kv_cache_bytes"):
            EngineConfig(kv_cache_bytes=bad)
    assert parse_size(format_size(152 * 1024 + 1)) >= 152 * 1024 + 1


def test_chat_session_keeps_history_and_resets(llm):
    s = ChatSession(llm, GREEDY, system="Be brief.")
    first = "".join(s.send("hello"))
    assert s.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    second = "".join(s.send("and again"))
    assert [m["role"] for m in s.messages()] == ["system", "user", "assistant", "user", "assistant"]
    want = llm.chat(s.messages()[:-1], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert second == want  # the whole history went through the template
    assert s.last.output_tokens == 12 and s.last.prompt_tokens > 0
    s.reset()
    assert s.history == [] and s.system == "Be brief."
    s.reset("Talk like a pirate.")
    assert s.messages() == [{"role": "system", "content": "Talk like a pirate."}]


def test_chat_session_drops_the_oldest_turns_to_fit(llm):
    notes = []
    s = ChatSession(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), notice=notes.append)
    for i in range(12):
        "".join(s.send("The quick brown fox jumps over the lazy dog. " * 2))
    assert notes and "dropped" in notes[0]
    assert len(llm._chat_ids(s.messages())[1]) <= 256


def test_refused_turn_leaves_the_history_unchanged(llm):
    s = ChatSession(llm, GREEDY)
    with pytest.raises(ValueError):
        "".join(s.send("x" * 2000))  # longer than the context on its own
    assert s.history == []


def test_repl_commands():
    class Fake:
        context_length = 256

        def _chat_ids(self, messages, add_generation_prompt=True):
            return "", [1] * (5 * len(messages))

        def stream(self, ids, params):
            from slimlm.engine.request import CompletionOutput, RequestOutput

            for i, piece in enumerate(["Hi", " there"]):
                yield RequestOutput("r", None, ids, [CompletionOutput(0, piece, [i], "length" if i else None)], bool(i))

    s = ChatSession(Fake(), GREEDY)  # type: ignore[arg-type]
    inp = io.StringIO("hello\n/stats\n/system be kind\n\n/bogus\nagain\n/reset\n/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    assert repl(s, inp, out, err, show_stats=False) == 0
    assert out.getvalue() == "Hi there\nHi there\n"
    e = err.getvalue()
    assert "[prompt 5 tokens, reply 2 tokens" in e and "finish: length" in e
    assert "system message set" in e and "unknown command '/bogus'" in e and "conversation cleared" in e
    assert s.history == [] and s.system == "be kind"
