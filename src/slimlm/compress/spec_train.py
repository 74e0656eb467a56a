"""Training the small trained parts of the speculative methods, with the target frozen.

``train_kangaroo``: the Kangaroo adapter (one attention block + norm, see
``engine/spec/kangaroo.py``) learns to map the target's hidden state entering layer
``exit_layer`` to the target's own next-token distribution (soft cross-entropy against the
target's softmax, on the draft head's vocabulary subset). The target's hidden states and
logits are computed once per window and cached, so several epochs cost only the adapter's
forward and backward; the report gives the tokens and the CPU time.

``train_judge``: the Judge-decoding head (``engine/spec/judge.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slimlm.errors import SlimLMError


@dataclass
class AdapterTrainConfig:
    exit_layer: int = 2
    head_vocab: int = 4096
    """Draft head over the most frequent tokens of the training text (0 = the whole vocabulary)."""
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    heldout: float = 0.1
    """Fraction of the windows kept out of training to measure the draft's top-1 agreement."""
    seed: int = 0


def _frequent_tokens(windows: torch.Tensor, n: int, vocab: int) -> torch.Tensor | None:
    if n <= 0 or n >= vocab:
        return None
    counts = torch.bincount(windows.flatten(), minlength=vocab)
    counts[counts.argsort(descending=True)[:n]] += 1  # ties broken by id below: stable order
    return counts.topk(n).indices.sort().values


@torch.no_grad()
def _target_features(model, windows: torch.Tensor, exit_layer: int, token_map, batch_size: int):
    """Per window: the hidden state entering ``exit_layer`` and the target's logits on the
    head subset, both (N, T, .)."""
    hs, ts = [], []
    w = model.lm_head.weight if token_map is None else model.lm_head.weight.index_select(0, token_map)
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        attn = model.dense_attention(pos)
        h = model.embed(ids)
        cos, sin = model.rotary(pos, h.dtype)
        for j, layer in enumerate(model.model.layers):
            if j == exit_layer:
                hs.append(h.clone())
            h = layer(h, cos, sin, attn)
        ts.append(torch.nn.functional.linear(model.model.norm(h), w))
    return torch.cat(hs), torch.cat(ts)


def train_kangaroo(model, windows: torch.Tensor, cfg: AdapterTrainConfig, log=print):
    """Returns (adapter, meta for adapter.json). ``windows`` (N, T) token ids."""
    from slimlm.engine.spec.kangaroo import KangarooAdapter, check_exit_layer

    mc = model.cfg
    check_exit_layer(cfg.exit_layer, mc.num_layers)
    if windows.shape[0] < 2:
        raise SlimLMError("adapter training needs at least 2 token windows (one is held out); give more tokens")
    model = model.float().eval().requires_grad_(False)
    cpu0, wall0 = time.process_time(), time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    n_held = max(1, int(round(windows.shape[0] * cfg.heldout)))
    train_w, held_w = windows[n_held:], windows[:n_held]
    token_map = _frequent_tokens(train_w, cfg.head_vocab, mc.vocab_size)
    h_tr, t_tr = _target_features(model, train_w, cfg.exit_layer, token_map, cfg.batch_size)
    h_he, t_he = _target_features(model, held_w, cfg.exit_layer, token_map, cfg.batch_size)
    w = model.lm_head.weight if token_map is None else model.lm_head.weight.index_select(0, token_map)
    torch.manual_seed(cfg.seed)
    ad = KangarooAdapter.from_target(model, cfg.exit_layer).float().requires_grad_(True)
    opt = torch.optim.AdamW(ad.parameters(), lr=cfg.lr, weight_decay=0.0)
    T = windows.shape[1]
    pos = torch.arange(T)[None]
    cos, sin = model.rotary(pos, torch.float32)

    def student(h):
        attn = model.dense_attention(pos.expand(h.shape[0], T))
        c, s = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
        return torch.nn.functional.linear(ad.norm(ad(h, c, s, attn)), w)

    def agreement(h, t):
        with torch.no_grad():
            return float((student(h).argmax(-1) == t.argmax(-1)).float().mean())

    before = agreement(h_he, t_he)
    loss_v = float("nan")
    for step in range(cfg.steps):
        idx = torch.randint(0, h_tr.shape[0], (min(cfg.batch_size, h_tr.shape[0]),), generator=g)
        logits = student(h_tr[idx])
        loss = -(t_tr[idx].softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if log and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"step {step}: soft cross-entropy {loss_v:.4f}")
    after = agreement(h_he, t_he)
    meta = {
        "exit_layer": cfg.exit_layer, "hidden_size": mc.hidden_size, "num_layers": mc.num_layers,
        "vocab_size": mc.vocab_size, "token_map": None if token_map is None else token_map.tolist(),
        "train": {"windows": int(train_w.shape[0]), "seq_len": T, "tokens": int(train_w.numel()),
                  "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "final_loss": loss_v,
                  "heldout_tokens": int(held_w.numel()), "heldout_top1_agreement_init": before,
                  "heldout_top1_agreement": after, "cpu_seconds": round(time.process_time() - cpu0, 1),
                  "wall_seconds": round(time.time() - wall0, 1), "threads": torch.get_num_threads()},
    }
    return ad, meta
