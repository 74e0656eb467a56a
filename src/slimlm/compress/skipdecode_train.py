"""Fine-tuning for SkipDecode (Del Corro et al. 2023): train the model to exit early on the
monotone schedule it will be served with (``hooks=["skipdecode"]``).

Each training window is a "prompt" of ``prompt_len`` tokens followed by a "generated" part.
Position p >= prompt_len (a generated token as input) carries generated index g = p - prompt_len,
as in the engine hook, and bypasses the lowest ``skipped(g)`` layers, with the hook's own
schedule; prompt rows run every layer. This is exactly the served computation: a
bypassed row keeps its hidden state through the skipped layers, and since ``skipped`` never
decreases with the position, every row that runs a layer attends only to earlier rows that ran
it too (the keys a bypassed row would write there are never read), so a dense causal forward
with ``h = where(bypassed, h, layer(h))`` equals the paged engine with the hook.

The loss is the next-token cross-entropy at every position (prompt rows keep the full model
working); only the decoder layers and the final norm are trained (embeddings and LM head
frozen). The result is an ordinary model folder; quality is reported before and after as the
held-out perplexity of the generated part under the same schedule, and without skipping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slimlm.engine.hooks.skipdecode import SkipDecode
from slimlm.errors import SlimLMError


@dataclass
class SkipTrainConfig:
    min_layers: int | None = None
    ramp: int = 32
    prompt_len: int = 64
    steps: int = 60
    batch_size: int = 2
    lr: float = 3e-5
    heldout: float = 0.15
    seed: int = 0


def layer_skips(hook: SkipDecode, T: int, prompt_len: int) -> torch.Tensor:
    """(T,) layers bypassed per position of a window whose prompt is ``prompt_len`` tokens."""
    return torch.tensor([hook.skipped(p - prompt_len) if p >= prompt_len else 0 for p in range(T)])


def skip_forward(model, ids: torch.Tensor, skips: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, T, V) of the dense model with per-position lower-layer bypass."""
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    attn = model.dense_attention(pos)
    h = model.embed(ids)
    cos, sin = model.rotary(pos, h.dtype)
    for i, layer in enumerate(model.model.layers):
        out = layer(h, cos, sin, attn)
        h = out if skips is None else torch.where((skips > i)[None, :, None], h, out)
    return model.head(h)


@torch.no_grad()
def generated_perplexity(model, windows: torch.Tensor, skips: torch.Tensor | None, prompt_len: int,
                         batch_size: int = 4) -> float:
    """Perplexity of the tokens after the prompt (predicted from rows prompt_len - 1 on)."""
    nll, n = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        lp = skip_forward(model, ids, skips)[:, prompt_len - 1 : -1].float().log_softmax(-1)
        tgt = ids[:, prompt_len:]
        nll -= float(lp.gather(-1, tgt[..., None]).sum())
        n += tgt.numel()
    return float(torch.exp(torch.tensor(nll / max(n, 1))))


def train_skipdecode(model, windows: torch.Tensor, cfg: SkipTrainConfig, log=print) -> dict:
    """Fine-tunes ``model`` in place (float32); returns the report."""
    T = windows.shape[1]
    if not 1 <= cfg.prompt_len < T - 1:
        raise SlimLMError(f"--prompt-len must be in 1..{T - 2} (the windows are {T} tokens)")
    if windows.shape[0] < 2:
        raise SlimLMError("skipdecode training needs at least 2 token windows (some are held out); give more tokens")
    hook = SkipDecode(min_layers=cfg.min_layers, ramp=cfg.ramp)
    hook.bind(model)
    skips = layer_skips(hook, T, cfg.prompt_len)
    model.float().train()
    model.requires_grad_(False)
    params = list(model.model.layers.parameters()) + list(model.model.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    cpu0, wall0 = time.process_time(), time.time()
    n_held = max(1, int(round(windows.shape[0] * cfg.heldout)))
    train_w, held_w = windows[n_held:], windows[:n_held]
    model.eval()
    before = {"skip": generated_perplexity(model, held_w, skips, cfg.prompt_len),
              "plain": generated_perplexity(model, held_w, None, cfg.prompt_len)}
    log(f"before: held-out perplexity of the generated part {before['skip']:.3f} with skipping, "
        f"{before['plain']:.3f} without")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    loss_v = float("nan")
    for step in range(cfg.steps):
        idx = torch.randint(0, train_w.shape[0], (min(cfg.batch_size, train_w.shape[0]),), generator=g)
        ids = train_w[idx]
        logits = skip_forward(model, ids, skips)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if log and (step % 10 == 0 or step == cfg.steps - 1):
            log(f"step {step}: loss {loss_v:.4f}")
    model.eval().requires_grad_(False)
    after = {"skip": generated_perplexity(model, held_w, skips, cfg.prompt_len),
             "plain": generated_perplexity(model, held_w, None, cfg.prompt_len)}
    gen = skips[cfg.prompt_len :]
    return {
        "min_layers": hook.min_layers, "ramp": cfg.ramp, "prompt_len": cfg.prompt_len, "seq_len": T,
        "mean_layers_skipped_generated": round(float(gen.float().mean()), 3), "num_layers": hook.num_layers,
        "tokens": int(train_w.shape[0] * T), "tokens_seen": int(cfg.steps * min(cfg.batch_size, train_w.shape[0]) * T),
        "steps": cfg.steps, "lr": cfg.lr, "final_loss": loss_v, "heldout_tokens": int(held_w.numel()),
        "heldout_ppl_before": before, "heldout_ppl_after": after,
        "cpu_seconds": round(time.process_time() - cpu0, 1), "wall_seconds": round(time.time() - wall0, 1),
        "threads": torch.get_num_threads(),
    }
