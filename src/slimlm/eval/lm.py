"""What a quality task scores: token log-probabilities of prompts and greedy continuations.

:class:`EngineLM` goes through the serving engine (``SamplingParams(prompt_logprobs=0)``), so KV
policies, hooks, dtype and every other engine option act on the score exactly as they act when
serving. :class:`TransformersLM` scores the same token ids with transformers, as a reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class ScoringLM(ABC):
    tokenizer: Any
    context_length: int | None
    """Longest input the system accepts (None: unbounded, e.g. a KV policy with a window)."""
    trained_length: int | None = None
    """The model's trained context (a RoPE extension or a KV policy may accept more)."""

    @abstractmethod
    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        """For each prompt, log p(token i | tokens < i) for i = 1 .. len - 1."""

    def attention_computed(self, lengths: list[int]) -> float | None:
        """Share of the causal query-key pairs of prompts of these lengths that prefill computed
        so far (None: all of them, dense attention)."""
        return None

    @abstractmethod
    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (stops at EOS or ``max_tokens``)."""


class EngineLM(ScoringLM):
    def __init__(self, llm):
        self.llm, self.tokenizer = llm, llm.tokenizer
        eng = llm.engine
        bounded = eng.policy is not None and eng.policy.max_blocks(1, 1) is not None
        self.context_length = None if bounded else eng.context_length
        self.trained_length = eng.model.cfg.context_length

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        from slimlm import SamplingParams

        sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        outs = self.llm.generate(prompts, sp, use_tqdm=False) if prompts else []
        return [[d[t] for d, t in zip(o.prompt_logprobs[1:], p[1:])] for o, p in zip(outs, prompts)]

    def attention_computed(self, lengths: list[int]) -> float | None:
        sparse = self.llm.engine.runner.paths.sparse_prefill
        if sparse is None:
            return None
        cfg = self.llm.engine.model.cfg
        total = sum(n * (n + 1) // 2 for n in lengths) * cfg.num_heads * cfg.num_layers
        skipped = sparse.stats.get("causal", 0)  # the rest ran dense
        return (total - skipped + sparse.stats.get("computed", 0)) / total

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from slimlm import SamplingParams

        outs = self.llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
        stop = set(self.llm.engine.stop_token_ids)
        return [[t for t in o.outputs[0].token_ids if t not in stop] for o in outs]


class TransformersLM(ScoringLM):
    """transformers on the same Hugging Face directory, one prompt at a time (no padding)."""

    def __init__(self, path, dtype: str = "float32"):
        import torch
        import transformers

        from slimlm.tokenizer import Tokenizer

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = Tokenizer.from_dir(path)
        self.context_length = self.trained_length = self.model.config.max_position_embeddings
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos = sorted(set([eos] if isinstance(eos, int) else list(eos or [])) | set(self.tokenizer.stop_token_ids()))

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        import torch

        res = []
        with torch.inference_mode():
            for p in prompts:
                x = torch.tensor([p])  # (1, T)
                lp = self.model(x).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
                res.append(lp.gather(-1, x[0, 1:, None])[:, 0].tolist())
        return res

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        import torch

        res = []
        with torch.inference_mode():
            for p in prompts:
                x = torch.tensor([p])
                out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                          do_sample=False, eos_token_id=self.eos or None, pad_token_id=0)
                toks = out[0, len(p):].tolist()
                cut = next((i for i, t in enumerate(toks) if t in self.eos), len(toks))
                res.append(toks[:cut])
        return res
