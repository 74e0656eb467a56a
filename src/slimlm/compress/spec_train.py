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

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimlm.errors import SlimLMError


def _train_record(cfg, train_w: torch.Tensor, held_w: torch.Tensor, final_loss: float, cpu0: float,
                  wall0: float, **extra) -> dict:
    """What a trained draft part records about its run (saved beside its weights)."""
    return {"windows": int(train_w.shape[0]), "seq_len": int(train_w.shape[1]), "tokens": int(train_w.numel()),
            "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "final_loss": final_loss,
            "heldout_tokens": int(held_w.numel()), **extra, "cpu_seconds": round(time.process_time() - cpu0, 1),
            "wall_seconds": round(time.time() - wall0, 1), "threads": torch.get_num_threads()}


def _check_windows(windows: torch.Tensor, what: str = "adapter") -> None:
    if windows.shape[0] < 2:
        raise SlimLMError(f"{what} training needs at least 2 token windows (one is held out); give more tokens")


def _check_chimera(windows: torch.Tensor, depth: int, feature_dtype: str, margin: int) -> None:
    """What both Chimera drafts' trainers need: held-out windows, windows longer than ``depth +
    margin`` and a feature dtype they can cache."""
    _check_windows(windows)
    if depth < 1 or windows.shape[1] < depth + margin + 1:
        raise SlimLMError(f"chimera depth must be >= 1 and the windows longer than depth + {margin} "
                          f"(seq_len {windows.shape[1]})")
    if feature_dtype not in ("float32", "bfloat16"):
        raise SlimLMError(f"feature dtype must be float32 or bfloat16, got {feature_dtype!r}")


@dataclass
class Checkpoint:
    """Resumable training (``slimlm train-adapter --checkpoint DIR``). Every ``every`` steps, and
    when a run ends, the trained parameters, the optimizer and lr-schedule states, the step, the
    RNG states (the batch sampler's included) and the training CPU time so far go to
    ``DIR/train-state.pt`` (a temporary file renamed over the old one: a crash loses at most
    ``every`` steps). ``resume`` continues from it, bit for bit as an uninterrupted run (test);
    ``stop_at`` ends this run after that many steps of the schedule, so one long schedule runs as
    several shorter commands, each writing the adapter as it is at its stop. A checkpoint of
    another configuration (``fingerprint``: the trainer's settings, the windows and ``model``) is
    refused."""

    folder: str
    every: int = 0
    resume: bool = False
    stop_at: int | None = None
    model: str = ""
    fingerprint: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.folder).expanduser() / "train-state.pt"

    def bind(self, cfg, windows: torch.Tensor, skip=("feature_cache", "compare", "feature_batch")) -> dict | None:
        """Sets the fingerprint from ``cfg`` and the windows; returns the saved state to resume
        from (None: start afresh)."""
        fp = {k: v for k, v in asdict(cfg).items() if k not in skip}
        fp["windows"] = hashlib.sha1(windows.numpy().tobytes()).hexdigest()[:16]
        fp["model"] = self.model
        self.fingerprint = fp
        if self.every < 0 or (self.stop_at is not None and self.stop_at < 1):
            raise SlimLMError("--checkpoint-every must be >= 0 and --stop-at >= 1")
        if not self.resume:
            return None
        if not self.path.is_file():
            raise SlimLMError(f"--resume: no checkpoint at {self.path} (start without --resume)")
        state = torch.load(self.path, weights_only=True)
        diff = sorted(k for k in set(fp) | set(state["fingerprint"]) if fp.get(k) != state["fingerprint"].get(k))
        if diff:
            raise SlimLMError(f"--resume: the checkpoint at {self.path} is of another run (differs in "
                              f"{', '.join(diff)})")
        return state

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        tmp.replace(self.path)


def _fit(params, lr: float, steps: int, loss_of, log, every: int, label: str, warmup: int | None = None,
         weight_decay: float = 0.0, progress=None, ckpt: Checkpoint | None = None, state: dict | None = None,
         rngs: tuple = (), extra: dict | None = None) -> tuple[float, dict]:
    """The loop every draft part trains with: AdamW on ``params``; ``warmup`` steps of linear
    warm-up then a linear decay to 5 % (None: constant lr); ``loss_of(step)`` gives the step's
    loss; logs ``label`` every ``every`` steps and at the last (``progress()`` appended).
    ``ckpt``: checkpoint as it says (``state``: a checkpoint to continue from, ``rngs``: the
    generators the loss draws from, ``extra``: kept in the checkpoint for the trainer). Returns
    the last loss and what the run did (``steps_done``, ``resumed_from``, ``cpu_seconds_training``:
    the loop's CPU time over every run of the schedule)."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = None if warmup is None else torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    loss_v, start, cpu_prev = float("nan"), 0, 0.0
    if state is not None:
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        for gen, st in zip(rngs, state["rngs"], strict=True):
            gen.set_state(st)
        torch.set_rng_state(state["torch_rng"])
        start, loss_v, cpu_prev = int(state["step"]), float(state["loss"]), float(state["cpu_s"])
        if log:
            log(f"resumed at step {start} of {steps} from {ckpt.path}")
    end = steps if ckpt is None or ckpt.stop_at is None else min(steps, max(start, ckpt.stop_at))
    cpu0 = time.process_time()

    def save(done: int) -> None:
        ckpt.save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
                   "scheduler": None if sched is None else sched.state_dict(), "step": done,
                   "rngs": [gen.get_state() for gen in rngs], "torch_rng": torch.get_rng_state(), "loss": loss_v,
                   "cpu_s": cpu_prev + time.process_time() - cpu0, "extra": extra or {}})

    for step in range(start, end):
        loss = loss_of(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_v = loss.item()
        if log and (step % every == 0 or step == steps - 1 or step == end - 1):
            log(f"step {step}: {label} {loss_v:.4f}" + (progress() if progress else ""))
        if ckpt is not None and ckpt.every and (step + 1) % ckpt.every == 0 and step + 1 < end:
            save(step + 1)
    if ckpt is not None:
        save(end)
    return loss_v, {"steps_done": end, "resumed_from": start if state is not None else None,
                    "cpu_seconds_training": round(cpu_prev + time.process_time() - cpu0, 1)}


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


def train_kangaroo(model, windows: torch.Tensor, cfg: AdapterTrainConfig, log=print, ckpt: Checkpoint | None = None):
    """Returns (adapter, meta for adapter.json). ``windows`` (N, T) token ids; ``ckpt``: resumable
    training (see :class:`Checkpoint`)."""
    from slimlm.engine.spec.kangaroo import KangarooAdapter, check_exit_layer

    mc = model.cfg
    check_exit_layer(cfg.exit_layer, mc.num_layers)
    _check_windows(windows)
    state = None if ckpt is None else ckpt.bind(cfg, windows)
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

    def loss_of(step):
        idx = torch.randint(0, h_tr.shape[0], (min(cfg.batch_size, h_tr.shape[0]),), generator=g)
        return -(t_tr[idx].softmax(-1) * student(h_tr[idx]).log_softmax(-1)).sum(-1).mean()

    before = agreement(h_he, t_he) if state is None else state["extra"]["before"]
    loss_v, run = _fit(ad.parameters(), cfg.lr, cfg.steps, loss_of, log, 50, "soft cross-entropy", ckpt=ckpt,
                       state=state, rngs=(g,), extra={"before": before})
    after = agreement(h_he, t_he)
    meta = {
        "exit_layer": cfg.exit_layer, "hidden_size": mc.hidden_size, "num_layers": mc.num_layers,
        "vocab_size": mc.vocab_size, "token_map": None if token_map is None else token_map.tolist(),
        "train": _train_record(cfg, train_w, held_w, loss_v, cpu0, wall0, heldout_top1_agreement_init=before,
                               heldout_top1_agreement=after, **run),
    }
    return ad, meta


@dataclass
class ChimeraTrainConfig:
    depth: int = 4
    """Draft steps the adapter learns (its step embeddings); drafting deeper reuses the last."""
    head_vocab: int = 4096
    steps: int = 1000
    batch_size: int = 256
    """Positions per step (each trains all ``depth`` draft steps)."""
    lr: float = 2e-3
    mlp_mult: int = 2
    heldout: float = 0.1
    seed: int = 0
    feature_batch: int = 4
    """Windows per target forward when the features are computed."""
    top: int = 32
    """The target's distribution is kept as its ``top`` most likely head tokens and the rest's
    total mass: the features of a few hundred thousand tokens then fit in memory (0 = the
    whole head, bfloat16)."""
    feature_dtype: str = "float32"
    """The target's dtype while its features are computed, once: "bfloat16" is the served
    default on CPU (the features then are the ones the engine hands the draft) and ~1.7x
    faster here; the draft itself trains in float32."""
    feature_cache: str | None = None
    """Folder for the target's features, shared with the full-context decoder's trainer (the
    same windows and settings read the same file; the hidden states are kept in bfloat16)."""


@torch.no_grad()
def _final_features(model, windows: torch.Tensor, token_map, batch_size: int, top: int = 0, log=None):
    """Per window: the target's final hidden state (pre-norm, float32) and its logits on the
    head subset: (N, T, S) bfloat16, or with ``top`` > 0 its ``top`` most likely head tokens as
    (log-probabilities float32, head indices int64), each (N, T, top)."""
    hs, ts, ti = [], [], []
    w = model.lm_head.weight if token_map is None else model.lm_head.weight.index_select(0, token_map)
    t0, n = time.process_time(), windows.shape[0]
    for i in range(0, n, batch_size):
        ids = windows[i : i + batch_size]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        attn = model.dense_attention(pos)
        h = model.embed(ids)
        cos, sin = model.rotary(pos, h.dtype)
        for layer in model.model.layers:
            h = layer(h, cos, sin, attn)
        hs.append(h.float())
        z = torch.nn.functional.linear(model.model.norm(h), w)
        if top > 0:
            lp = z.float().log_softmax(-1)
            v, j = lp.topk(min(top, z.shape[-1]), -1)
            ts.append(v)
            ti.append(j)
        else:
            ts.append(z.to(torch.bfloat16))
        if log and (i // batch_size) % 50 == 49:
            log(f"features: {i + len(ids)}/{n} windows, {time.process_time() - t0:.0f} CPU s")
    if top > 0:
        return torch.cat(hs), (torch.cat(ts), torch.cat(ti))
    return torch.cat(hs), torch.cat(ts)


def _soft_ce(logits: torch.Tensor, z) -> torch.Tensor:
    """Cross-entropy of the draft's head logits against the target's distribution ``z``: a
    dense (..., S) tensor of logits, or (log-probabilities, indices) of its top entries; then
    the rest of the head is one more outcome (the target's remaining mass against the draft's
    mass outside those entries), so the loss stays a proper cross-entropy."""
    lp = logits.log_softmax(-1)
    if isinstance(z, tuple):
        v, j = z
        p = v.exp()
        q_top = lp.gather(-1, j)
        p_rest = (1 - p.sum(-1)).clamp(min=0)
        lq_rest = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-6))
        return -((p * q_top).sum(-1) + p_rest * lq_rest).mean()
    return -(z.float().softmax(-1) * lp).sum(-1).mean()


def _z_top1(z) -> torch.Tensor:
    return z[1][..., 0] if isinstance(z, tuple) else z.argmax(-1)


def _chimera_batch(ids, H, Z, depth: int, wi: torch.Tensor, p: torch.Tensor):
    """Rows for positions (wi, p): hidden H[wi, p] predicts, at draft step j, the token
    p + 2 + j from the trigram ids[p-1+j .. p+1+j]; its target is Z[wi, p+1+j] (Z dense, or
    a (values, indices) pair of the target's top entries)."""
    j = torch.arange(depth)
    pj = p[:, None] + j[None]  # (B, depth)
    tri = torch.stack([ids[wi[:, None], pj - 1], ids[wi[:, None], pj], ids[wi[:, None], pj + 1]], -1)
    z = tuple(x[wi[:, None], pj + 1] for x in Z) if isinstance(Z, tuple) else Z[wi[:, None], pj + 1].float()
    return H[wi, p][:, None].expand(-1, depth, -1), tri, j.expand(p.shape[0], -1), z


def train_chimera(model, windows: torch.Tensor, cfg: ChimeraTrainConfig, log=print, ckpt: Checkpoint | None = None,
                  name: str = ""):
    """Returns (draft, meta for adapter.json). The draft learns the target's next-token
    distributions (soft cross-entropy) ``depth`` tokens ahead of its last hidden state.
    ``ckpt``: resumable training (:class:`Checkpoint`); ``name``: the target's name, part of
    the feature cache's key."""
    from slimlm.engine.spec.chimera import ChimeraDraft

    mc = model.cfg
    T = windows.shape[1]
    _check_chimera(windows, cfg.depth, cfg.feature_dtype, 3)
    state = None if ckpt is None else ckpt.bind(cfg, windows)
    model = model.to(getattr(torch, cfg.feature_dtype)).eval().requires_grad_(False)
    cpu0, wall0 = time.process_time(), time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    n_held = max(1, int(round(windows.shape[0] * cfg.heldout)))
    train_w, held_w = windows[n_held:], windows[:n_held]
    if cfg.feature_cache:
        from slimlm.compress.chimera_attn_train import _cached_features

        token_map, H_all, (Zv, Zi), cpu_feat = _cached_features(model, windows, cfg, name, log)
        H, Hh = H_all[n_held:], H_all[:n_held]
        Z, Zh = (Zv[n_held:], Zi[n_held:]), (Zv[:n_held], Zi[:n_held])
    else:
        token_map = _frequent_tokens(train_w, cfg.head_vocab, mc.vocab_size)
        H, Z = _final_features(model, train_w, token_map, cfg.feature_batch, cfg.top, log)
        Hh, Zh = _final_features(model, held_w, token_map, cfg.feature_batch, cfg.top)
        cpu_feat = time.process_time() - cpu0
    model = model.float()
    w = model.lm_head.weight if token_map is None else model.lm_head.weight.index_select(0, token_map)
    emb = model.model.embed_tokens
    torch.manual_seed(cfg.seed)
    net = ChimeraDraft(mc.hidden_size, cfg.depth, mc.rms_norm_eps, cfg.mlp_mult)
    net.norm_h.load_state_dict(model.model.norm.state_dict())
    net.norm.load_state_dict(model.model.norm.state_dict())
    hi = T - cfg.depth - 1  # p + 1 + (depth - 1) <= T - 1

    def logits_of(h, tri, j):
        return torch.nn.functional.linear(net(h, emb(tri).flatten(-2), j), w)

    def agreement(ids, H_, Z_):
        """Held-out top-1 agreement with the target per draft step (teacher-forced)."""
        hits = torch.zeros(cfg.depth)
        n = ids.shape[0]
        for w0 in range(0, n, 8):  # a few windows at a time: (positions, depth, S) logits
            wi = torch.arange(w0, min(w0 + 8, n)).repeat_interleave(hi - 1)
            p = torch.arange(1, hi).repeat(len(wi) // (hi - 1))
            with torch.no_grad():
                h, tri, j, z = _chimera_batch(ids, H_, Z_, cfg.depth, wi, p)
                hits += (logits_of(h, tri, j).argmax(-1) == _z_top1(z)).float().sum(0)
        return (hits / (n * (hi - 1))).tolist()

    before = agreement(held_w, Hh, Zh) if state is None else state["extra"]["before"]
    coverage = 1.0 if token_map is None else round(float(torch.isin(held_w, token_map).float().mean()), 4)

    def loss_of(step):
        wi = torch.randint(0, train_w.shape[0], (cfg.batch_size,), generator=g)
        p = torch.randint(1, hi, (cfg.batch_size,), generator=g)
        h, tri, j, z = _chimera_batch(train_w, H, Z, cfg.depth, wi, p)
        return _soft_ce(logits_of(h, tri, j), z)

    loss_v, run = _fit(net.parameters(), cfg.lr, cfg.steps, loss_of, log, 100, "soft cross-entropy", warmup=50,
                       progress=lambda: f" ({time.process_time() - cpu0:.0f} CPU s)", ckpt=ckpt, state=state,
                       rngs=(g,), extra={"before": before})
    after = agreement(held_w, Hh, Zh)
    meta = {
        "depth": cfg.depth, "mlp_mult": cfg.mlp_mult, "hidden_size": mc.hidden_size, "num_layers": mc.num_layers,
        "vocab_size": mc.vocab_size, "token_map": None if token_map is None else token_map.tolist(),
        "train": _train_record(cfg, train_w, held_w, loss_v, cpu0, wall0,
                               heldout_top1_agreement_init=round(sum(before) / len(before), 4),
                               heldout_top1_agreement=round(sum(after) / len(after), 4),
                               heldout_top1_agreement_per_step=[round(a, 4) for a in after],
                               cpu_seconds_features=round(cpu_feat, 1), top=cfg.top,
                               feature_dtype=cfg.feature_dtype, head_vocab_coverage=coverage,
                               parameters=sum(p.numel() for p in net.parameters()), **run),
    }
    return net, meta


@dataclass
class JudgeTrainConfig:
    corrupt_every: int = 8
    """One position in this many is corrupted per window (and paired with its clean twin)."""
    top: int = 5
    """Wrong tokens are drawn from the target's top ``top`` at the position."""
    steps: int = 400
    lr: float = 1e-2
    heldout: float = 0.1
    seed: int = 0
    feature_batch: int = 4


@torch.no_grad()
def _final_hidden(model, ids: torch.Tensor):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    attn = model.dense_attention(pos)
    h = model.embed(ids)
    cos, sin = model.rotary(pos, h.dtype)
    for layer in model.model.layers:
        h = layer(h, cos, sin, attn)
    return h


@torch.no_grad()
def _judge_features(model, windows: torch.Tensor, cfg: JudgeTrainConfig, g: torch.Generator):
    """Features (M, D) and labels (M,): the final hidden state at a position whose input token
    is the text's own (1) or a plausible wrong one (0), same context. Also, per pair, whether
    the text's token was the target's argmax (where the judge can add acceptance: it is not)."""
    feats, labels, mism = [], [], []
    T = windows.shape[1]
    for i in range(0, windows.shape[0], cfg.feature_batch):
        ids = windows[i : i + cfg.feature_batch]
        h = _final_hidden(model, ids)
        top = model.head(h).topk(cfg.top + 1, -1).indices  # (B, T, top+1): predictions for t + 1
        bad = ids.clone()
        rows, cols, wrong = [], [], []
        for b in range(ids.shape[0]):
            off = int(torch.randint(0, cfg.corrupt_every, (1,), generator=g))
            for t in range(max(off, 1), T, cfg.corrupt_every):
                cand = [c for c in top[b, t - 1].tolist() if c != int(ids[b, t])][: cfg.top]
                c = cand[int(torch.randint(0, len(cand), (1,), generator=g))]
                rows.append(b)
                cols.append(t)
                wrong.append(c)
                mism.append(int(top[b, t - 1, 0]) != int(ids[b, t]))
        r, c = torch.tensor(rows), torch.tensor(cols)
        bad[r, c] = torch.tensor(wrong)
        hb = _final_hidden(model, bad)
        feats += [h[r, c], hb[r, c]]
        labels += [torch.ones(len(rows)), torch.zeros(len(rows))]
    n = len(mism)
    return torch.cat(feats), torch.cat(labels), torch.tensor(mism, dtype=torch.bool), n


def train_judge(model, windows: torch.Tensor, cfg: JudgeTrainConfig, log=print, ckpt: Checkpoint | None = None):
    """Returns (head, meta). Logistic regression of "correct token" on the target's final
    hidden state; reports held-out accuracy, and the acceptance of correct tokens the target
    would have rejected (text token != target argmax) vs of wrong tokens at accept = 0.5."""
    from slimlm.engine.spec.judge import JudgeHead

    mc = model.cfg
    _check_windows(windows, "judge")
    state = None if ckpt is None else ckpt.bind(cfg, windows)
    model = model.float().eval().requires_grad_(False)
    cpu0, wall0 = time.process_time(), time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    n_held = max(1, int(round(windows.shape[0] * cfg.heldout)))
    X, y, _, _ = _judge_features(model, windows[n_held:], cfg, g)
    Xh, yh, mh, nh = _judge_features(model, windows[:n_held], cfg, g)
    cpu_feat = time.process_time() - cpu0
    torch.manual_seed(cfg.seed)
    head = JudgeHead(mc.hidden_size)
    loss_v, run = _fit(head.parameters(), cfg.lr, cfg.steps,
                       lambda step: torch.nn.functional.binary_cross_entropy_with_logits(head(X), y), log, 100,
                       "logistic loss", weight_decay=1e-4, ckpt=ckpt, state=state)
    with torch.no_grad():
        p = torch.sigmoid(head(Xh)) >= 0.5
    pos, neg = p[:nh], p[nh:]
    meta = {
        "hidden_size": mc.hidden_size, "num_layers": mc.num_layers, "vocab_size": mc.vocab_size,
        "train": {"windows": int(windows.shape[0] - n_held), "seq_len": int(windows.shape[1]),
                  "tokens": int(windows[n_held:].numel()), "pairs": int(X.shape[0] // 2), "steps": cfg.steps,
                  "final_loss": loss_v, "heldout_pairs": nh,
                  "heldout_accuracy": round(float((p.float() == yh).float().mean()), 4),
                  "heldout_accept_correct": round(float(pos.float().mean()), 4),
                  "heldout_accept_correct_mismatched": round(float(pos[mh].float().mean()), 4) if mh.any() else None,
                  "heldout_accept_wrong": round(float(neg.float().mean()), 4),
                  "cpu_seconds_features": round(cpu_feat, 1),
                  "cpu_seconds": round(time.process_time() - cpu0, 1),
                  "wall_seconds": round(time.time() - wall0, 1), "threads": torch.get_num_threads(), **run},
    }
    return head, meta
