"""Training Chimera's full-context decoder (``engine/spec/chimera_attn.py``), target frozen.

The target's final hidden states and its top-``top`` head distribution of every position are
computed once (``spec_train._final_features``) and, with ``feature_cache``, kept on disk
(safetensors, keyed by the windows, the model and the settings) so a second run — another
learning rate, a resumed budget — costs no target forward at all.

The draft trains on whole windows, so its attention learns: pass 0 reads the target's real
features (teacher forcing, causal over the window); pass j (``depth`` passes in all, the
"training-time test" of EAGLE-3) reads the feature pass j - 1 predicted one position earlier
and attends the real keys up to j positions back plus the keys of its own earlier predicted
positions — exactly what draft step j + 1 sees while serving. Loss per pass: the soft
cross-entropy against the target's top-``top`` distribution of the next token (as the MLP
draft) + ``feat_weight`` x smooth-L1 of the predicted vs the target's next feature (RMS-normalized
per position: the draft works in normalized units), as EAGLE.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimlm.compress.spec_train import (
    Checkpoint,
    _check_chimera,
    _final_features,
    _fit,
    _frequent_tokens,
    _soft_ce,
    _train_record,
)
from slimlm.errors import SlimLMError


@dataclass
class AttnTrainConfig:
    depth: int = 3
    """Draft steps trained (unrolled passes over the window)."""
    head_vocab: int = 4096
    steps: int = 300
    batch_size: int = 4
    """Windows per step (every position of each trains)."""
    lr: float = 1e-3
    feat_weight: float = 1.0
    heldout: float = 0.1
    seed: int = 0
    feature_batch: int = 4
    top: int = 32
    feature_dtype: str = "float32"
    feature_cache: str | None = None
    """Folder for the target's features (written once, read when the same data comes again)."""
    compare: str | None = None
    """An MLP Chimera adapter folder: its held-out agreement on the same windows is reported."""


FEATURE_PART = 64
"""Windows per part file while the cache is being filled: a run stopped during the target's
forward passes keeps the parts it finished and the next run computes only the rest."""


def _cached_features(model, windows: torch.Tensor, cfg: AttnTrainConfig, name: str, log):
    """(token_map, H, (Zv, Zi)) of train and held-out windows, from ``cfg.feature_cache`` when it
    holds them for exactly these windows, model and settings. While the cache is filled, every
    ``FEATURE_PART`` windows go to a part file first (the same batches of ``feature_batch``
    windows as one pass: the same values), so a run stopped part-way loses at most one part."""
    from safetensors.torch import load_file, save_file

    h = hashlib.sha1(windows.numpy().tobytes())
    h.update(json.dumps([name, cfg.head_vocab, cfg.top, cfg.feature_dtype, cfg.heldout]).encode())
    key = h.hexdigest()[:16]
    path = None if cfg.feature_cache is None else Path(cfg.feature_cache).expanduser() / f"features-{key}.safetensors"
    m = model.to(getattr(torch, cfg.feature_dtype)).eval().requires_grad_(False)  # read or computed: the same
    # weights after (the trainers go back to float32 from the feature dtype's rounded weights)
    if path is not None and path.is_file():
        t = load_file(str(path))
        if log:
            log(f"features read from {path}")
        tm = t.get("token_map")
        return tm, t["H"].float(), (t["Zv"], t["Zi"].long()), float(t["cpu_s"])
    if cfg.top < 1:
        raise SlimLMError("the attention decoder trains on the target's top-N distribution: --top must be >= 1")
    cpu0 = time.process_time()
    n_held = max(1, int(round(windows.shape[0] * cfg.heldout)))
    token_map = _frequent_tokens(windows[n_held:], cfg.head_vocab, model.cfg.vocab_size)
    if path is None:
        H, (Zv, Zi) = _final_features(m, windows, token_map, cfg.feature_batch, cfg.top, log)
        return token_map, H.to(torch.bfloat16).float(), (Zv, Zi), time.process_time() - cpu0
    path.parent.mkdir(parents=True, exist_ok=True)
    step = FEATURE_PART - FEATURE_PART % cfg.feature_batch or cfg.feature_batch
    parts, cpu_before = [], 0.0
    for i in range(0, windows.shape[0], step):
        part = path.with_name(f"{path.stem}.part{i // step:04d}.safetensors")
        if part.is_file():
            t = load_file(str(part))
            cpu_before += float(t.pop("cpu_s"))
        else:
            c0 = time.process_time()
            Hp, (Zv, Zi) = _final_features(m, windows[i : i + step], token_map, cfg.feature_batch, cfg.top)
            t = {"H": Hp.to(torch.bfloat16), "Zv": Zv, "Zi": Zi.to(torch.int32)}
            save_file({**t, "cpu_s": torch.tensor(time.process_time() - c0)}, str(part))
            if log:
                log(f"features: {min(i + step, windows.shape[0])}/{windows.shape[0]} windows, "
                    f"{time.process_time() - cpu0:.0f} CPU s (part files in {path.parent})")
        parts.append((part, t))
    t = {k: torch.cat([x[k] for _, x in parts]) for k in ("H", "Zv", "Zi")}
    cpu = cpu_before + time.process_time() - cpu0
    t["cpu_s"] = torch.tensor(cpu)
    if token_map is not None:
        t["token_map"] = token_map
    save_file(t, str(path))
    for part, _ in parts:
        part.unlink()
    return token_map, t["H"].float(), (t["Zv"], t["Zi"].long()), cpu


def _pass_mask(T: int, j: int) -> torch.Tensor:
    """(T, (j + 1) T) what the query at position p of pass j sees: the real keys (pass 0) up to
    p - j, the key of pass m (1..j-1) at position p - j + m, and its own key at p."""
    p = torch.arange(T)[:, None]
    q = torch.arange(T)[None]
    parts = [q <= p - j if j else q <= p]
    parts += [q == p - j + m for m in range(1, j)]
    if j:
        parts.append(q == p)
    return torch.cat(parts, -1)


def unrolled(net, emb: torch.Tensor, H: torch.Tensor, cos, sin, scale: float, depth: int) -> list[torch.Tensor]:
    """The draft's ``depth`` passes over windows: emb (B, T, D) embeddings of the next tokens,
    H (B, T, D) the target's features. Returns each pass's predicted next features (B, T, D)
    (pass j at position p: from the real features up to p - j and its own predictions)."""
    from slimlm.engine.spec.chimera_attn import DraftKV

    B, T, _ = H.shape
    outs, ks, vs = [], [], []
    feat = H
    for j in range(depth):
        mask = _pass_mask(T, j).to(H.device).expand(B, T, -1)
        kv = DraftKV(scale, mask, torch.cat(ks, 2) if ks else None, torch.cat(vs, 2) if vs else None)
        g = net(emb, feat, cos, sin, kv)
        outs.append(g)
        ks.append(kv.new_k)
        vs.append(kv.new_v)
        feat = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1].detach()], 1)  # position p reads g of p - 1
    return outs


def train_chimera_attn(model, windows: torch.Tensor, cfg: AttnTrainConfig, name: str = "", log=print,
                       ckpt: Checkpoint | None = None):
    """Returns (draft, meta for adapter.json); ``ckpt``: resumable training (see
    ``spec_train.Checkpoint``)."""
    from slimlm.engine.spec.chimera_attn import AttnDraft

    mc = model.cfg
    T = windows.shape[1]
    _check_chimera(windows, cfg.depth, cfg.feature_dtype, 2)
    state = None if ckpt is None else ckpt.bind(cfg, windows)
    cpu0, wall0 = time.process_time(), time.time()
    token_map, H, Z, cpu_feat = _cached_features(model, windows, cfg, name, log)
    model = model.float().eval().requires_grad_(False)
    n_held = max(1, int(round(windows.shape[0] * cfg.heldout)))
    w = model.lm_head.weight if token_map is None else model.lm_head.weight.index_select(0, token_map)
    emb_t = model.model.embed_tokens
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = AttnDraft.from_target(model).float()
    pos = torch.arange(T - 1)[None]
    cos, sin = model.rotary(pos, torch.float32)

    def passes(wi: torch.Tensor):
        ids = windows[wi]
        e = emb_t(ids[:, 1:])  # (B, T-1, D): the token after each position
        c, s = cos.expand(len(wi), -1, -1), sin.expand(len(wi), -1, -1)
        return unrolled(net, e, H[wi, :-1], c, s, model.attn_scale, cfg.depth)

    def loss_of(wi: torch.Tensor) -> torch.Tensor:
        total = 0.0
        z = tuple(x[wi, 1:] for x in Z)  # the target's distribution of the token after next
        for j, gj in enumerate(passes(wi)):
            gj = gj[:, j:]  # positions p >= j have a prediction to read
            logits = nn.functional.linear(model.model.norm(gj), w)
            ce = _soft_ce(logits, tuple(x[:, j:] for x in z))
            reg = nn.functional.smooth_l1_loss(gj, nn.functional.rms_norm(H[wi, 1 + j :], (H.shape[-1],)))
            total = total + ce + cfg.feat_weight * reg
        return total / cfg.depth

    def agreement() -> list[float]:
        hits, n = torch.zeros(cfg.depth), 0
        with torch.no_grad():
            for w0 in range(0, n_held, 4):
                wi = torch.arange(w0, min(w0 + 4, n_held))
                top1 = Z[1][wi, 1:, 0]
                for j, gj in enumerate(passes(wi)):
                    pred = nn.functional.linear(model.model.norm(gj[:, cfg.depth - 1 :]), w).argmax(-1)
                    hits[j] += float((pred == top1[:, cfg.depth - 1 :]).sum())
                n += top1[:, cfg.depth - 1 :].numel()
        return (hits / n).tolist()

    before = agreement() if state is None else state["extra"]["before"]
    n_train = windows.shape[0] - n_held

    def batch_loss(step):
        return loss_of(n_held + torch.randint(0, n_train, (min(cfg.batch_size, n_train),), generator=g))

    loss_v, run = _fit(net.parameters(), cfg.lr, cfg.steps, batch_loss, log, 50, "loss", warmup=30,
                       progress=lambda: f" ({time.process_time() - cpu0:.0f} CPU s)", ckpt=ckpt, state=state,
                       rngs=(g,), extra={"before": before})
    after = agreement()
    extra = {}
    if cfg.compare:
        extra["mlp_draft_heldout_top1_agreement_per_step"] = mlp_agreement(model, cfg.compare, windows[:n_held],
                                                                           H[:n_held], Z[1][:n_held, :, 0], token_map,
                                                                           cfg.depth)
    train_w, held_w = windows[n_held:], windows[:n_held]
    meta = {
        "decoder": "attention", "depth": cfg.depth, "hidden_size": mc.hidden_size, "num_layers": mc.num_layers,
        "vocab_size": mc.vocab_size, "token_map": None if token_map is None else token_map.tolist(),
        "train": _train_record(cfg, train_w, held_w, loss_v, cpu0, wall0, feat_weight=cfg.feat_weight,
                               heldout_top1_agreement_init=round(sum(before) / len(before), 4),
                               heldout_top1_agreement=round(sum(after) / len(after), 4),
                               heldout_top1_agreement_per_step=[round(a, 4) for a in after], **extra,
                               cpu_seconds_features=round(cpu_feat, 1), top=cfg.top, feature_dtype=cfg.feature_dtype,
                               parameters=sum(p.numel() for p in net.parameters()), **run),
    }
    return net, meta


@torch.no_grad()
def mlp_agreement(model, adapter: str, ids: torch.Tensor, H: torch.Tensor, top1: torch.Tensor, token_map,
                  depth: int) -> list[float]:
    """The MLP Chimera draft's teacher-forced top-1 agreement per draft step on the same
    windows and positions as ``train_chimera_attn``'s (step j from the real feature j
    positions back): ids (N, T), H (N, T, D) features, top1 (N, T) the target's top-1 head
    index (of ``token_map``) at each position."""
    from slimlm.engine.spec.chimera import ChimeraDraft
    from slimlm.engine.spec.kangaroo import load_adapter

    meta, state = load_adapter(adapter, "chimera", model)
    if meta.get("decoder", "mlp") != "mlp":
        raise SlimLMError(f"--compare wants an MLP chimera adapter; '{adapter}' has decoder {meta['decoder']!r}")
    net = ChimeraDraft(model.cfg.hidden_size, int(meta["depth"]), model.cfg.rms_norm_eps, int(meta.get("mlp_mult", 2)))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    tm = torch.tensor(meta["token_map"]) if meta.get("token_map") else None
    w = model.lm_head.weight if tm is None else model.lm_head.weight.index_select(0, tm)
    full = (lambda x: x) if token_map is None else (lambda x: token_map[x])
    mine = (lambda x: x) if tm is None else (lambda x: tm[x])
    N, T = ids.shape
    hits = []
    for j in range(depth):
        p = torch.arange(depth - 1 - j, T - 1 - j)  # the real feature's positions (the same targets for every j)
        tri = torch.stack([ids[:, (p - 1 + j).clamp(min=0)], ids[:, p + j], ids[:, p + 1 + j]], -1)
        step = torch.full(p.shape, j).expand(N, -1)
        y = net(H[:, p], model.model.embed_tokens(tri).flatten(-2), step)
        pred = mine(nn.functional.linear(y, w).argmax(-1))
        hits.append(round(float((pred == full(top1[:, p + 1 + j])).float().mean()), 4))
    return hits
