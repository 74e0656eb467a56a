"""The plain KV pool's write at one prefill step's shapes (2,200 rows; SmolLM2-135M: 3 KV heads of 64,
bf16; k and v head slices of a q/k/v row, as the model passes them): index_copy_ per pool against
the native row copy (kernels/elementwise.py kv_write), CPU time at 1 thread, medians of 50 calls,
3 rounds each interleaved.

  python docs/results/raw/ab_kv_write.py"""
import time, torch, statistics
torch.set_num_threads(1)
from slimlm.kernels import elementwise as ew
M, nb, bs = 2200, 4000, 16
qkv = torch.randn(M, 15, 64).bfloat16()
k, v = qkv[:, 9:12], qkv[:, 12:]
kp = torch.zeros(nb, bs, 3, 64, dtype=torch.bfloat16); vp = torch.zeros_like(kp)
slots = torch.arange(5000, 5000 + M)
def t(f, n=50):
    f(); ts = []
    for _ in range(n):
        a = time.thread_time(); f(); ts.append(time.thread_time() - a)
    return statistics.median(ts) * 1e3
def ic():
    kp.view(-1, 192).index_copy_(0, slots, k.reshape(M, 192)); vp.view(-1, 192).index_copy_(0, slots, v.reshape(M, 192))
with torch.inference_mode():
    for _ in range(3):
        print("index_copy_ %.3f ms  kv_write %.3f ms" % (t(ic), t(lambda: ew.kv_write(k, v, slots, kp, vp))))
