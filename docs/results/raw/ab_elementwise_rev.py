"""Same-process A/B of the elementwise kernels' builds (kernels/elementwise.c) at one prefill step's
shapes (SmolLM2-135M, bf16, 2,200 rows): a git revision's build (default HEAD) against this tree's,
RMSNorm alone, the residual add + RMSNorm, RoPE of the q and k heads; CPU time at 1 thread, medians
of 10 calls per round, medians of 7 interleaved rounds; checks both builds give the same bits.

  python docs/results/raw/ab_elementwise_rev.py [REV]"""
import sys, time, statistics, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
torch.set_num_threads(1)
import kernel_rev
from slimlm.kernels import elementwise as ew
M = 2200
gu = torch.randn(1, M, 3072).bfloat16()
x = torch.randn(1, M, 576).bfloat16(); r = torch.randn(1, M, 576).bfloat16(); w = torch.rand(576).bfloat16()
qkv = torch.randn(1, M, 960).bfloat16(); cos = torch.randn(1, M, 64).bfloat16(); sin = torch.randn(1, M, 64).bfloat16()
with tempfile.TemporaryDirectory() as tmp:
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    libs = {"HEAD": kernel_rev.build("elementwise", rev, Path(tmp)), "tree": kernel_rev.build("elementwise", None, Path(tmp))}
    res = {n: {"rms": [], "rms+res": [], "rope": []} for n in libs}
    outs = {}
    for rnd in range(7):
        for n, lib in (libs.items() if rnd % 2 else reversed(list(libs.items()))):
            ew._lib = lambda *t, lib=lib: lib
            with torch.inference_mode():
                for name, f in (("rms", lambda: ew.rms_norm(x, w, 1e-5)), ("rms+res", lambda: ew.rms_norm(x, w, 1e-5, r)),
                                ("rope", lambda: ew.rope(qkv[..., :768], cos, sin, 64))):
                    ts = []
                    for _ in range(10):
                        a = time.thread_time(); o = f(); ts.append(time.thread_time() - a)
                    res[n][name].append(statistics.median(ts))
                    outs[n, name] = o
    for name in ("rms", "rms+res", "rope"):
        same = all(torch.equal(a, b) for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (outs["HEAD", name], outs["tree", name]))))
        h, t = statistics.median(res["HEAD"][name]), statistics.median(res["tree"][name])
        print(f"{name:8s} {rev} {h*1e3:.2f} ms  tree {t*1e3:.2f} ms  {h/t:.2f}x  bitwise same: {same}")
