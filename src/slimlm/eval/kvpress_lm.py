"""kvpress (NVIDIA's KV-cache compression library) as an optional eval system, side by side with
slimlm's KV policies on the same examples.

``slimlm eval needle --system kvpress --press snapkv --press-ratio 0.5`` (and ``bench frontier
--kvpress snapkv:0.5``): transformers on the model's Hugging Face directory, the prompt's KV
compressed by the press in one prefill (kvpress's prefill-only mode), then greedy decoding on the
compressed cache with the positions the full prompt had (as kvpress's own pipeline decodes).
``--press-keep-last N`` leaves the last N prompt tokens out of the compression window (kvpress's
pipeline compresses the context and appends the question uncompressed); the default 0 compresses
the whole prompt but its last token, question included, which is what slimlm's online policies
see (the last token is always fed after the press, so the first answer token is computed from the
compressed KV too, not from the full prefill).

kvpress compresses only after a prefill, one sequence at a time, so it cannot score prompt
log-probabilities under compression (perplexity, ``mc``): those tasks refuse with one line.

Not installed (it is an optional baseline, not a CI requirement): ``unavailable()`` says how to
install it. kvpress 0.5.5 declares ``transformers<5.3`` and imports ``datasets`` at module level;
installed with ``--no-deps`` next to this environment's transformers it works through two small
adaptations made here, at run time, without touching kvpress: its forward hook reads the cache
under the name ``past_key_values`` and a ``cache_position`` (newer transformers pass ``cache`` and
no cache position; the hook here only ever runs in the prefill, so the position is 0 .. q_len - 1),
and a missing ``datasets`` is replaced, while kvpress is imported, by a module whose
``load_dataset`` raises (only kvpress's DuoAttention press uses it, not run here).
"""

from __future__ import annotations

import importlib.util
import sys
import types

from slimlm.errors import SlimLMError
from slimlm.eval.lm import TransformersLM

PRESSES = {"streamingllm": "StreamingLLMPress", "snapkv": "SnapKVPress", "observed": "ObservedAttentionPress",
           "knorm": "KnormPress", "tova": "TOVAPress", "expected": "ExpectedAttentionPress"}
"""Press names accepted here -> kvpress class. ``observed`` is kvpress's H2O-style press."""

INSTALL = ("pip install --no-deps kvpress==0.5.5 cachetools==5.5.2 fire==0.6.0 termcolor==2.5.0 six==1.17.0 "
           "(the 'kvpress' extra)")


def unavailable() -> str | None:
    if importlib.util.find_spec("kvpress") is None:
        return f"kvpress baseline skipped: kvpress is not installed ({INSTALL})"
    if importlib.util.find_spec("transformers") is None:
        return "kvpress baseline skipped: transformers is not installed"
    return None


def _import_kvpress():
    why = unavailable()
    if why:
        raise SlimLMError(why)
    if "kvpress" not in sys.modules and importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")

        def load_dataset(*a, **k):
            raise SlimLMError("the datasets package is not installed (kvpress's DuoAttention press needs it)")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
        try:
            import kvpress
        finally:  # kvpress holds its own reference; nothing else should find a stub "datasets"
            sys.modules.pop("datasets", None)
        return kvpress
    import kvpress

    return kvpress


def make_press(name: str, ratio: float):
    """A kvpress press by name, compressing ``ratio`` of the KV (0 < ratio < 1)."""
    if name not in PRESSES:
        raise SlimLMError(f"unknown press '{name}'; known: {', '.join(PRESSES)}")
    if not 0.0 < ratio < 1.0:
        raise SlimLMError(f"press compression ratio must be in (0, 1), got {ratio}")
    kvpress = _import_kvpress()
    press = getattr(kvpress, PRESSES[name])(compression_ratio=ratio)
    inner = press.forward_hook

    def hook(module, inputs, kwargs, output):
        import torch

        kw = dict(kwargs)
        if "past_key_values" not in kw:
            kw["past_key_values"] = kwargs.get("cache")
        if "cache_position" not in kw:
            kw["cache_position"] = torch.arange(kwargs["hidden_states"].shape[1])
        return inner(module, inputs, kw, output)

    press.forward_hook = hook  # the instance attribute is what press(model) registers
    return press


class KVPressLM(TransformersLM):
    """transformers + one kvpress press, one prompt at a time."""

    def __init__(self, path, dtype: str = "float32", press: str = "snapkv", ratio: float = 0.5, keep_last: int = 0):
        import transformers

        self.press = make_press(press, ratio)  # fails early on a bad name or ratio
        if keep_last < 0:
            raise SlimLMError(f"--press-keep-last must be >= 0, got {keep_last}")
        self.press_name, self.ratio, self.keep_last = press, ratio, keep_last
        super().__init__(path, dtype)
        if press == "observed":  # needs the attention weights: eager attention
            import torch

            transformers.logging.set_verbosity_error()
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
        self.kept: list[int] = []
        """Per greedy prompt: KV tokens stored per layer after the press (for the report)."""

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        raise SlimLMError("kvpress compresses the KV only after a prefill, so prompt log-probabilities (perplexity, "
                          "mc) are those of the full KV; only generation tasks (needle) are scored with a press")

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        import torch
        from transformers import DynamicCache

        res = []
        with torch.inference_mode():
            for p in prompts:
                # at least the last prompt token is fed after the press, so every generated token (the
                # first included) is computed from the compressed KV, never from the prefill's full one
                cut = len(p) - min(max(self.keep_last, 1), len(p) - 1)
                ctx, tail = p[:cut], p[cut:]
                cache = DynamicCache()
                with self.press(self.model):
                    out = self.model(input_ids=torch.tensor([ctx]), cache=cache)
                self.kept.append(cache.get_seq_length())
                pos = len(ctx)
                if tail:
                    x = torch.tensor([tail])
                    out = self.model(input_ids=x, cache=cache, position_ids=torch.arange(pos, pos + len(tail))[None])
                    pos += len(tail)
                toks = [int(out.logits[0, -1].argmax())]
                while len(toks) < max_tokens and toks[-1] not in self.eos:
                    out = self.model(input_ids=torch.tensor([[toks[-1]]]), cache=cache,
                                     position_ids=torch.tensor([[pos]]))
                    pos += 1
                    toks.append(int(out.logits[0, -1].argmax()))
                cut_at = next((i for i, t in enumerate(toks) if t in self.eos), len(toks))
                res.append(toks[:cut_at])
        return res
