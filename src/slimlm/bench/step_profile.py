"""Where a batch-1 decode step goes: ``python -m slimlm.bench.step_profile [--weights gguf]``.

Times every linear layer (dense or packed) inside real engine steps, and the native decode-layer
calls (``model/quant/native_layers.py``: whole layers, their matmuls included) where the model
takes that path (packed, or dense fp32 / bf16; ``SLIMLM_DECODE_LAYER=0``: the layer-by-layer path)
and a dense model's native LM head (``model/quant/native_head.py``; ``SLIMLM_NATIVE_HEAD=0``: PyTorch's),
then prints the
``torch.profiler`` table of the same steps (native kernels called through ctypes do not show as
aten ops; the timers cover them)."""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from slimlm import LLM, SamplingParams
    from slimlm.model.quant import QuantLinear
    from slimlm.model.quant.native_head import NativeHead
    from slimlm.model.quant.native_layers import NativeDecodeLayers

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--weights", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    eng = LLM(a.model, dtype=a.dtype, weights=a.weights, kv_cache_bytes="64M").engine
    spent = [0.0, 0.0, 0.0]  # linear layers called alone, native decode layers, native head

    def timed(forward, i=0):
        def run(self, *args):
            t = time.perf_counter()
            y = forward(self, *args)
            spent[i] += time.perf_counter() - t
            return y
        return run

    QuantLinear.forward = timed(QuantLinear.forward)
    torch.nn.Linear.forward = timed(torch.nn.Linear.forward)
    NativeDecodeLayers.run = timed(NativeDecodeLayers.run, 1)
    NativeHead.__call__ = timed(NativeHead.__call__, 2)
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=8 * a.steps, ignore_eos=True))
    for _ in range(6):
        eng.step()
    best = []
    for _ in range(5):
        spent[:] = [0.0, 0.0, 0.0]
        t = time.perf_counter()
        for _ in range(a.steps):
            eng.step()
        best.append(((time.perf_counter() - t) / a.steps, *(x / a.steps for x in spent)))
    step, lin, nat, head = min(best)
    native = f"native decode layers {nat * 1000:.1f} ms, " if eng.runner.native_layers is not None else ""
    native += f"native head {head * 1000:.1f} ms, " if isinstance(eng.runner.head, NativeHead) else ""
    print(f"{a.weights} {a.dtype}: step {step * 1000:.1f} ms, {native}linear layers called alone "
          f"{lin * 1000:.1f} ms, rest {(step - lin - nat - head) * 1000:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            eng.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
