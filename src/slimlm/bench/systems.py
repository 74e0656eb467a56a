"""The systems under test, as a benchmark worker sees them: load once, then time a prefill or a
decode of given token ids, and say how many KV bytes the last request held at its peak.

- ``slimlm``: the engine (:class:`slimlm.LLM`) with the run's engine options.
- ``transformers``: ``AutoModelForCausalLM`` from the same Hugging Face directory, same dtype and
  threads, called as a Python user would (``generate``; a streamer timestamps each token).
- ``llama.cpp``: llama-cpp-python on a GGUF (an optional extra slimlm never installs).

Every system gets the same token ids (slimlm's tokenizer of the same model directory).
The parent checks availability first (:func:`unavailable`), so a missing optional baseline is a
note in the report, not a failed run.
"""

from __future__ import annotations

import importlib.util
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from slimlm.registry import Registry


class System(ABC):
    name: ClassVar[str]
    tokenizer: Any
    context_length: int

    @abstractmethod
    def __init__(self, args: dict[str, Any]): ...

    @abstractmethod
    def prefill(self, ids: list[int]) -> float:
        """Seconds from the call to the first generated token (time to first token)."""

    @abstractmethod
    def decode(self, ids: list[int], n: int) -> tuple[float, list[float]]:
        """Greedy-generate exactly ``n`` tokens; (start time, perf_counter time of each token)."""

    def kv_bytes(self) -> float | None:
        """KV-cache bytes the last request held at its peak (None if unknown)."""
        return None


SYSTEMS: Registry[System] = Registry("system")


def hf_dir(model: str) -> Path | None:
    """The Hugging Face directory holding ``model``'s weights (named models: the slimlm cache)."""
    from slimlm.model.hub import KNOWN_MODELS, ensure_cached

    if model in KNOWN_MODELS:
        return ensure_cached(KNOWN_MODELS[model])
    p = Path(model).expanduser()
    return p if (p / "config.json").is_file() else None


def model_config(model: str):
    """``model``'s ModelConfig, from its config.json when there is a directory (no weights loaded)."""
    import json

    from slimlm.model.config import ModelConfig

    d = hf_dir(model)
    if d is not None:
        return ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    from slimlm.model.hub import load

    return load(model).config


def unavailable(system: str, model: str) -> str | None:
    """Why ``system`` cannot run here (a note for the report), or None."""
    if system == "transformers":
        if importlib.util.find_spec("transformers") is None:
            return "transformers baseline skipped: transformers is not installed (pip install 'slimlm[bench]')"
        if hf_dir(model) is None:
            return f"transformers baseline skipped: {model} is not a Hugging Face directory (`slimlm convert` one)"
    if system == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return ("llama.cpp baseline skipped: llama-cpp-python is not installed (optional; it compiles for about "
                "6 minutes: pip install llama-cpp-python==0.3.36)")
    return None


def gguf_for_llamacpp(model: str, gguf: str | None) -> tuple[str, str]:
    """(path, quantization) of the GGUF llama.cpp runs: ``gguf`` if it is a file, the model itself
    if it is one, else the same weights written once as a GGUF of type ``gguf`` (default F32)."""
    from slimlm.model.hub import load, slimlm_home

    if gguf and Path(gguf).is_file():
        return gguf, _gguf_type(gguf)
    if str(model).endswith(".gguf") and Path(model).is_file():
        return model, _gguf_type(model)
    qtype = (gguf or "F32").upper()
    out = slimlm_home() / "gguf" / f"{Path(str(model)).name}-{qtype}.gguf"
    if not out.is_file():
        from slimlm.model.gguf import write_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        lm = load(model)
        tmp = out.with_suffix(".tmp")
        write_gguf(lm.model, lm.tokenizer, tmp, qtype)
        tmp.replace(out)
    return str(out), qtype


def _gguf_type(path: str) -> str:
    import gguf

    r = gguf.GGUFReader(path)
    kinds = {t.tensor_type.name for t in r.tensors if len(t.shape) == 2}
    return "/".join(sorted(kinds)) or "unknown"


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@SYSTEMS.register("slimlm")
class SlimlmSystem(System):
    def __init__(self, args: dict[str, Any]):
        from slimlm import LLM
        from slimlm.model.hub import load

        _threads(args["threads"])
        engine = args.get("engine", {})  # packed weights are packed while loading (no fp32 copy)
        lm = load(args["model"], dtype=args["dtype"], weights=engine.get("weights"),
                  group_size=engine.get("weights_group_size"))
        self.llm = LLM(lm, dtype=args["dtype"], **args.get("engine", {}))
        self.tokenizer, self.context_length = lm.tokenizer, lm.config.context_length
        eng = self.llm.engine
        self.block_bytes = eng.bytes_per_block
        self._peak_blocks = 0

    def _run(self, ids: list[int], n: int) -> tuple[float, list[float]]:
        from slimlm import SamplingParams

        eng = self.llm.engine
        eng.pool.reset_prefix_cache()  # every measurement computes its prompt
        t0 = time.perf_counter()
        rid = eng.add_request(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        times: list[float] = []
        peak = 0
        while eng.has_unfinished():
            for out in eng.step():
                if out.request_id == rid:
                    times += [time.perf_counter()] * (len(out.outputs[0].token_ids) - len(times))
            peak = max(peak, eng.pool.num_used())
        self._peak_blocks = peak
        return t0, times

    def prefill(self, ids: list[int]) -> float:
        t0, times = self._run(ids, 1)
        return times[0] - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[float]]:
        return self._run(ids, n)

    def kv_bytes(self) -> float:
        return float(self._peak_blocks * self.block_bytes)


@SYSTEMS.register("transformers")
class TransformersSystem(System):
    def __init__(self, args: dict[str, Any]):
        import torch
        import transformers

        from slimlm.tokenizer import Tokenizer

        _threads(args["threads"])
        transformers.logging.set_verbosity_error()
        path = hf_dir(args["model"])
        self.tokenizer = Tokenizer.from_dir(path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, args["dtype"])).eval()
        self.context_length = self.model.config.max_position_embeddings
        self._kv: float | None = None

    def _generate(self, ids: list[int], n: int, streamer=None):
        import torch

        x = torch.tensor([ids])
        with torch.inference_mode():
            return self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0, streamer=streamer,
                                       return_dict_in_generate=True)

    def prefill(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self._generate(ids, 1)
        return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[float]]:
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self):
                self.times: list[float] = []
                self.prompt_seen = False

            def put(self, value):
                if self.prompt_seen:  # the first put is the prompt
                    self.times.append(time.perf_counter())
                self.prompt_seen = True

            def end(self):
                pass

        clock = Clock()
        t0 = time.perf_counter()
        out = self._generate(ids, n, clock)
        self._kv = cache_bytes(out.past_key_values)
        return t0, clock.times

    def kv_bytes(self) -> float | None:
        return self._kv


def cache_bytes(cache) -> float | None:
    """Bytes of a transformers KV cache (DynamicCache of any recent version, or legacy tuples)."""
    import torch

    tensors: list = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    elif isinstance(cache, (tuple, list)):
        tensors = [t for layer in cache for t in layer]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return float(sum(t.numel() * t.element_size() for t in tensors)) if tensors else None


@SYSTEMS.register("llama.cpp")
class LlamaCppSystem(System):
    """llama-cpp-python's ``Llama`` (F16 KV cache, its default). Not installed by slimlm."""

    def __init__(self, args: dict[str, Any]):
        from llama_cpp import Llama

        from slimlm.tokenizer import Tokenizer

        d = hf_dir(args["model"])
        if d is not None:
            self.tokenizer = Tokenizer.from_dir(d)
        else:
            from slimlm.model.gguf import read_gguf

            self.tokenizer = read_gguf(args["gguf"])[2]
        self.context_length = args["n_ctx"]
        self.llm = Llama(model_path=args["gguf"], n_ctx=args["n_ctx"], n_threads=args["threads"],
                         n_threads_batch=args["threads"], n_batch=512, verbose=False)
        md = self.llm.metadata
        arch = md.get("general.architecture", "llama")
        layers, kv_heads = int(md[f"{arch}.block_count"]), int(md.get(f"{arch}.attention.head_count_kv", 0))
        head_dim = int(md[f"{arch}.embedding_length"]) // int(md[f"{arch}.attention.head_count"])
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, f16
        self._tokens = 0

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)  # computes the logits of the last position: the first token is their argmax
        self._tokens = len(ids)
        return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[float]]:
        times: list[float] = []
        t0 = time.perf_counter()
        for _ in self.llm.generate(ids, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        self._tokens = len(ids) + n
        return t0, times

    def kv_bytes(self) -> float:
        return float(self._tokens * self.bytes_per_token)
