"""Per-layer attention call at an 8,160-token context, one sequence, SmolLM2-135M shapes (9 query /
3 KV heads of 64), random keys: the full native decode kernel vs a query policy's whole native
path (its Python, then the selection in C + sparse attention in one call of sparse_decode.c),
CPU ms per call at 1 thread. Random keys make
Squeezed's clusters unlike real ones (it reads 0.6 of the keys here, 0.4 on real text).
Usage: python docs/results/raw/mb_sparse_decode.py [bf16] [prof]"""
import time, torch, cProfile, pstats, sys
from slimlm import kernels
from slimlm.kernels.ops import native_decode
from slimlm.model.config import ModelConfig
from slimlm.model.rope import RotaryEmbedding
from slimlm.kvcache.spec import KVCacheSpec
from slimlm.kvcache.storage import PagedKVCache
from slimlm.kvcache.policy import KV_POLICIES
from slimlm.engine.paged_attention import DecodeGroup
torch.set_num_threads(1)
L, bs = 8160, 16
cfg = ModelConfig(vocab_size=10, hidden_size=576, intermediate_size=1536, num_layers=1, num_heads=9, num_kv_heads=3,
                  head_dim=64, max_position_embeddings=16384)
dt = torch.bfloat16 if "bf16" in sys.argv else torch.float32
cache = PagedKVCache(KVCacheSpec.from_model(cfg, dt), 520, bs, "cpu")
nb = -(-L // bs)
blocks = torch.randperm(520)[:nb]
slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()[:L]
cache.write(0, slots, torch.randn(L, 3, 64).to(dt), torch.randn(L, 3, 64).to(dt))
rot = RotaryEmbedding(cfg)
kpos = torch.arange(nb * bs); kpos[L:] = -1
g = DecodeGroup(torch.tensor([0]), torch.tensor([[L - 1]]), blocks, kpos[None], nb)
q = torch.randn(1, 9, 64)
kp, vp = cache.pools(0)
pd, sd = kernels.load("paged_decode"), kernels.load("sparse_decode")
def tm(f, n=30):
    f(); t = time.process_time()
    for _ in range(n): f()
    return 1000 * (time.process_time() - t) / n
print("full kernel", round(tm(lambda: native_decode(pd, q, kp, vp, cache.codec.native_code, blocks[None].contiguous(), torch.tensor([L]), 0.125)), 3), "ms")
for name in ("squeezed", "shadowkv"):
    pol = KV_POLICIES.get(name)()
    meta = {}
    f = lambda: pol.attend_native(sd, 0, q, cache, g, rot, 0.125, meta)
    print(name, round(tm(f), 3), "ms", "read", round(pol.stats["bytes_read"] / pol.stats["bytes_full"], 3))
    if "prof" in sys.argv:
        pr = cProfile.Profile(time.process_time); pr.enable()
        for _ in range(30): f()
        pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(14)
