"""torch.compile trial on the CPU decode step: the MLP sub-block (RMSNorm + fused gate/up +
SiLU*mul + down + residual) compiled once as a free function shared by every layer, vs eager.
Prints batch-1 decode ms/step for both, interleaved."""
import time, sys, torch, torch.nn.functional as F
from slimlm import LLM, SamplingParams
torch.set_num_threads(2)
dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
eng = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine

def mlp_res(x, nw, eps: float, gu, down):
    h = F.rms_norm(x, nw.shape, nw, eps) if x.dtype == torch.float32 else x
    g, u = F.linear(h, gu).chunk(2, -1)
    return x + F.linear(F.silu(g) * u, down)

cmlp = torch.compile(mlp_res, dynamic=True)
layers = eng.model.model.layers
orig = [l.mlp_block for l in layers]
def use(compiled):
    for l, o in zip(layers, orig):
        if compiled:
            l.mlp_block = (lambda x, rows=None, l=l: cmlp(x, l.post_attention_layernorm.weight, l.post_attention_layernorm.eps,
                                                          l.mlp.gate_up.weight, l.mlp.down_proj.weight) if rows is None else o(x, rows))
        else:
            l.mlp_block = o
def run(n=32):
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4): eng.step()
    t = time.perf_counter()
    for _ in range(n): eng.step()
    dt = (time.perf_counter() - t) / n
    while eng.has_unfinished(): eng.step()
    return dt * 1000
t = time.perf_counter(); use(True); run(4); print(f"compile+warmup {time.perf_counter()-t:.1f} s", flush=True)
res = {"eager": [], "compiled": []}
for r in range(4):
    for k in ("eager", "compiled"):
        use(k == "compiled"); res[k].append(run())
import statistics
for k, v in res.items():
    print(k, "median ms/step", round(statistics.median(v), 2), [round(x, 1) for x in v])
print("compiled/eager speed ratio", round(statistics.median(res["eager"]) / statistics.median(res["compiled"]), 3))
