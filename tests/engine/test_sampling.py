"""Sampling functions, parameter validation, stop strings and the generate command."""

from __future__ import annotations

import pytest
import torch

from slimlm.cli import main
from slimlm.engine.params import SamplingParams
from slimlm.engine.sampling import SequenceSampler, apply_penalties, apply_top_k_top_p_min_p, sample_next
from slimlm.engine.stop import StopChecker
from slimlm.tokenizer import IncrementalDetokenizer


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    out = apply_top_k_top_p_min_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.8, 1.0]),
                                  torch.tensor([0.0, 0.0, 0.25]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False, False]  # top-k 2
    assert kept[1].tolist() == [True, True, True, False, False]   # 0.5+0.2 < 0.8 -> third needed
    assert kept[2].tolist() == [True, True, True, False, False]   # p >= 0.25 * 0.5
    assert torch.equal(out[kept], logits[kept])


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0, 0, 3, 0]])
    out = apply_penalties(logits, seen, counts, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.1]))
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 1.0 - 0.5 - 0.3, 0.5]]))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(n=0),
                                 dict(max_tokens=0), dict(top_k=-2), dict(logprobs=50)])
def test_invalid_params_name_the_parameter(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_seeded_sampling_is_independent_of_batch_composition():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=123, top_p=0.9)
    alone = [sample_next(logits[1:2], [s])[0][0] for s in [SequenceSampler(p, [1])] for _ in range(20)]
    batch = [SequenceSampler(SamplingParams(temperature=0.7), [1]), SequenceSampler(p, [1]),
             SequenceSampler(SamplingParams(temperature=0), [1])]
    together = [sample_next(logits[:3], batch)[0][1] for _ in range(20)]
    assert alone == together
    assert len(set(alone)) > 1  # it really samples


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    s = SequenceSampler(SamplingParams(temperature=1.0, seed=0), [0])
    draws = torch.tensor([sample_next(logits, [s])[0][0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_logprobs_returned():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    _, (lp,) = sample_next(logits, [SequenceSampler(SamplingParams(temperature=0, logprobs=2), [0])])
    ref = logits.log_softmax(-1)[0]
    assert set(lp) == {0, 1} and abs(lp[0] - float(ref[0])) < 1e-6


def test_stop_checker_holds_back_partial_stop_strings():
    sc = StopChecker(["END", "\n\n"])
    assert sc.update("hello E") == (False, 6)      # "E" may start "END"
    assert sc.update("hello EN") == (False, 6)
    assert sc.update("hello ENx") == (False, 9)
    assert sc.update("hello ENx END more") == (True, 10)
    assert StopChecker(["END"], include_stop=True).update("a END") == (True, 5)


def test_incremental_detokenizer_matches_full_decode(tiny_llama_dir):
    from slimlm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_llama_dir)
    ids = tok.encode("héllo wörld, small models 12345 ünïcode")
    d = IncrementalDetokenizer(tok)
    text = "".join(d.push([i]) for i in ids) + d.flush()
    assert text == tok.decode(ids)


def test_generate_cli_streams_greedy_text_and_stops(tiny_llama_dir, capsys):
    from slimlm.engine.reference import ReferenceDecoder
    from slimlm.model.hub import load

    lm = load(tiny_llama_dir)
    prompt = "The quick brown"
    ids = lm.tokenizer.encode(prompt)
    toks = [e.token_id for e in ReferenceDecoder(lm.model, lm.stop_token_ids()).stream(
        ids, SamplingParams(temperature=0, max_tokens=12))]
    expected = lm.tokenizer.decode(toks)
    assert main(["generate", "--model", str(tiny_llama_dir), "--temperature", "0", "--max-tokens", "12", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n"
    assert "tok/s" in out.err
    stop = expected.strip()[3:6]
    assert stop and main(["generate", "--model", str(tiny_llama_dir), "--temperature", "0", "--max-tokens", "12",
                          "--stop", stop, prompt]) == 0
    assert capsys.readouterr().out == expected[: expected.index(stop)] + "\n"
