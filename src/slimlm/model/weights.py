"""Hugging Face directory format: read and write config, weights and tokenizer.

Weights come only from safetensors (single or sharded) or, for legacy ``*.bin``/``*.pt``
checkpoints, from ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from slimlm.errors import ModelLoadError
from slimlm.model.config import ModelConfig
from slimlm.model.transformer import CausalLM, RotaryEmbedding

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def mmap_large_blocks(loading: bool) -> None:
    """Set glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``) and heap trim threshold
    (``M_TRIM_THRESHOLD``). ``loading=True``: 256 KiB and glibc's default 128 KiB, so the many
    converted / de-quantized temporaries of a load are unmapped as soon as they are freed instead
    of fragmenting the heap (int4 SmolLM2-135M: load peak 674 -> 529 MiB, steady 444 -> 429 MiB;
    ``docs/results/raw/rss_phases.py``). ``False``: 32 MiB and 64 MiB, where glibc's own dynamic
    rule ends up in a process that has freed large tensors (setting a value turns that rule off,
    so both are set): activations keep reusing heap pages. With the trim threshold left at 128
    KiB, every freed activation at the top of the heap went back to the OS and the next step
    faulted it in again: a bf16 prefill of 15.7k tokens took 557k page faults instead of 13k,
    1.33x its CPU time (docs/benchmarks.md, "session 13: prefill steps"). A no-op off glibc."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, (256 << 10) if loading else (32 << 20))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (128 << 10) if loading else (64 << 20))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_freed_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``). Loading frees many temporary
    buffers (de-quantized or converted tensors); without this their pages stay in the resident
    set until reused. A no-op elsewhere."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class meta_skeleton(TorchFunctionMode):
    """Modules built inside take meta tensors and compute nothing: their state is assigned next.

    ``torch.device("meta")`` alone runs every initializer (``normal_``, ``kaiming_uniform_``) and
    ``arange`` through PyTorch's Python meta functions, and their first call imports torch.fx's
    symbolic shapes and torch._dynamo (sympy included): ~70 MiB resident for the rest of the
    process, more than half a packed 135M model (``docs/results/raw/rss_phases.py``). Here an
    in-place call on a meta tensor is skipped (it would only initialize what the state dict
    overwrites), and value factories (``arange``, ``linspace``, ``logspace``: RoPE frequencies,
    small) compute on the CPU; every other factory without a device makes a meta tensor."""

    VALUES = {torch.arange, torch.linspace, torch.logspace}
    RESHAPING = {"resize_", "resize_as_", "set_", "squeeze_", "unsqueeze_", "transpose_", "t_", "as_strided_",
                 "swapdims_", "swapaxes_", "requires_grad_", "share_memory_"}
    """In-place calls that change a tensor's shape or flags, not its values: always run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and name not in self.RESHAPING:  # values, in place
            target = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if target is not None and target.is_meta:
                return target
        if func in _device_constructors() and kwargs.get("device") is None:
            kwargs["device"] = "cpu" if func in self.VALUES else "meta"
        return func(*args, **kwargs)


def default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a name; "auto" is bf16 where the device computes it natively
    (``slimlm.model.dtype_auto``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from slimlm.model.dtype_auto import auto_dtype

        dtype = auto_dtype(str(device))
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"no config.json in {path}")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ModelLoadError(f"cannot parse {cfg_file}: {e}") from None
    try:
        return ModelConfig.from_hf(raw)
    except KeyError as e:
        raise ModelLoadError(f"{cfg_file} lacks required key {e}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"bad shard index {index}: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    legacy = sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("*.pt"))
    if legacy:
        return legacy
    raise ModelLoadError(f"no weights in {path} (expected *.safetensors)")


def read_state_dict(path: Path, transform=None) -> dict[str, torch.Tensor]:
    """``transform(key, tensor) -> entries``, if given, is applied to each tensor as it is read
    (packing weights on load, so the full-precision state never exists at once)."""
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for key in sf.keys():
                        t = sf.get_tensor(key)
                        state.update(transform(key, t) if transform else {key: t})
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelLoadError(f"corrupted safetensors file {f}: {e}") from None
        else:
            try:  # never unpickle arbitrary objects
                loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ModelLoadError(f"cannot load {f} safely (weights_only=True): {str(e).splitlines()[0]}") from None
            loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
            for key, t in loaded.items():
                state.update(transform(key, t) if transform else {key: t})
    return state


def build_model(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "checkpoint",
    consume: bool = False,
    owned: bool = False,
) -> CausalLM:
    """Instantiate a model without initialising weights, then assign ``state`` into it.
    ``consume=True``: ``state`` is taken over (its entries are replaced one at a time by the
    model's converted tensors), so a load never holds every checkpoint tensor and its converted
    copy at once; the caller must not use ``state`` afterwards. ``owned=True``: the tensors sit in
    the process's own memory (not a mapped file), so one already of the right dtype and device
    is kept as it is instead of copied (a GGUF's packed embedding: 27 MiB less at the load peak)."""
    from slimlm.model import quant

    if not consume:
        state = dict(state)
    for k in [k for k in state if k.endswith("rotary_emb.inv_freq")
              or (cfg.tie_word_embeddings and k.startswith("lm_head."))]:
        del state[k]
    packed = quant.spec(cfg)  # a quantized checkpoint: its packed modules, by name
    with meta_skeleton():
        model = CausalLM(cfg)
        if packed:
            quant.prepare(model, packed["modules"])
    expected = {k: p.shape for k, p in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise ModelLoadError(f"{source} does not match its config: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ModelLoadError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, config implies {tuple(shape)}"
            )
    # copy=True: never keep tensors backed by a memory-mapped file that may change under us
    keep = quant.packed_keys(model)  # packed buffers keep their own dtypes
    for k in list(state):  # one tensor at a time: the source is dropped as its copy is made
        state[k] = state[k].to(device=device, dtype=None if k in keep else dtype, copy=not owned)
    model.load_state_dict(state, strict=False, assign=True)
    if packed:
        quant.finish(model, dtype)
    elif cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg).to(device)  # non-persistent buffers were on meta
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    return model.eval()


def save_model_dir(
    model: CausalLM,
    path: str | Path,
    tokenizer=None,
    generation_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    from slimlm.model.quant import packed_keys

    keep = packed_keys(model)
    state = {
        k: v.detach().to(v.dtype if k in keep else dtype or v.dtype).contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (cfg.tie_word_embeddings and k.startswith("lm_head."))
    }
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(path / "model.safetensors", default_file_mode())  # safetensors writes 0600
    hf = cfg.to_hf()
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    gen = dict(generation_config or {})
    gen.setdefault("bos_token_id", cfg.bos_token_id)
    gen.setdefault("eos_token_id", cfg.eos_token_id)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
    return path
