"""KV-head compression (Yu et al., "Effectively Compress KV Heads for LLM", 2024): MHA/GQA -> fewer
KV heads, offline, by low-rank projections of the grouped keys and values fitted on calibration
activations. ``slimlm compress-kv SRC DST --kv-heads H`` writes a normal GQA checkpoint (H KV
heads) that slimlm and transformers load as they load any model: the KV cache is Hkv / H times
smaller, with no change to any attention path.

The model's KV heads are split into H groups of g = Hkv / H consecutive heads (the query heads
of a group keep attending to the group's one new head). Per layer, the covariance of the
attention input Σ = E[x xᵀ] (x with a trailing 1, so biases ride along) is gathered once over the
calibration windows, and for each group:

- **Values** (no RoPE): the g heads' values stacked, v = A x (g·d), are projected on the top d
  eigenvectors U (g·d × d) of A Σ Aᵀ (PCA of the value activations, uncentred): the new head
  stores v' = Uᵀ A x, and head j's value is read back as U_j v' (U_j: head j's d rows of U). U_j
  is folded into the output projection (W_o[:, query heads of j] @ U_j): exact for the
  projection, nothing is computed at run time.
- **Keys** (RoPE): a projection of the keys cannot be folded into the queries, because the
  rotation R_p between them does not commute with an arbitrary d × d matrix. The paper therefore
  restricts the key transform to ones that commute with RoPE. Here: RoPE rotates each frequency's
  pair of channels (i, i + d/2) as a complex number z_j ↦ z_j e^{i p θ_i}, and the only maps that
  commute with every such rotation are complex scalars on each pair. So, per frequency i, the g
  heads' complex keys z = (z_1 .. z_g) are approximated by u z' with u ∈ C^g the top eigenvector
  of E[z zᴴ] = Z Σ Zᴴ and z' = uᴴ z the new head's key (a complex rank-1 PCA per frequency).
  Then R_p(u_j z') = u_j R_p(z'), and a query head of j scores Re(q conj(u_j z')) = Re((q
  conj(u_j)) conj(z')): conj(u_j) — a scaled rotation of the pair — is folded into the query
  projection, and both sides keep their ordinary RoPE. (Our reading of the paper's "specialized
  strategies for key caches with RoPE"; it is exact for the projection and needs no run-time
  change.)

Quality before/after and the recovery run are in docs/techniques.md.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimLMError


def check_kv_heads(cfg, kv_heads: int) -> None:
    """One-line errors before anything runs."""
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1:
        raise SlimLMError(f"--kv-heads must be a positive integer, got {kv_heads!r}")
    if cfg.num_heads % kv_heads:
        raise SlimLMError(f"--kv-heads {kv_heads} does not divide the model's {cfg.num_heads} query heads")
    if kv_heads >= cfg.num_kv_heads:
        raise SlimLMError(f"--kv-heads {kv_heads} is not fewer than the model's {cfg.num_kv_heads} KV heads")
    if cfg.num_kv_heads % kv_heads:
        raise SlimLMError(f"--kv-heads {kv_heads} does not divide the model's {cfg.num_kv_heads} KV heads "
                          "(each new head replaces an equal group of old ones)")
    if cfg.head_dim % 2:
        raise SlimLMError(f"head size {cfg.head_dim} is odd: RoPE pairs channels")


def _augmented(lin: torch.nn.Linear) -> torch.Tensor:
    """[W | b] (out, in + 1) in float64."""
    W = lin.weight.detach().double()
    b = lin.bias.detach().double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    return torch.cat([W, b[:, None]], dim=1)


def _set(lin: torch.nn.Linear, A: torch.Tensor) -> torch.nn.Linear:
    """A new Linear from [W | b] (a bias only if the old one had one)."""
    new = torch.nn.Linear(A.shape[1] - 1, A.shape[0], bias=lin.bias is not None)
    new = new.to(lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(A[:, :-1].to(lin.weight.dtype))
        if lin.bias is not None:
            new.bias.copy_(A[:, -1].to(lin.weight.dtype))
    return new


@torch.no_grad()
def input_covariances(model, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer: E[x xᵀ] (D + 1, D + 1) of the attention input (after the input norm), x with a
    trailing 1, over every token of ``windows`` (N, T); float64."""
    layers = model.model.layers
    D = model.cfg.hidden_size
    sums = [torch.zeros(D + 1, D + 1, dtype=torch.float64) for _ in layers]
    count = [0]
    handles = []

    def hook(i):
        def f(_m, inputs):
            x = inputs[0].reshape(-1, D).double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            sums[i] += x.T @ x
        return f

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.k_proj.register_forward_pre_hook(hook(i)))
        for s in range(0, len(windows), batch_size):
            model(windows[s : s + batch_size].to(model.device))
            count[0] += windows[s : s + batch_size].numel()
    finally:
        for h in handles:
            h.remove()
    return [S / count[0] for S in sums]


def _top_eigvecs(C: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvectors (n, k) of the k largest eigenvalues, share of the trace they hold)."""
    w, V = torch.linalg.eigh(C)
    w = w.real if w.is_complex() else w
    top = V[:, -k:].flip(-1)
    return top, float(w[-k:].clamp_min(0).sum() / w.clamp_min(0).sum().clamp_min(1e-30))


def _sqrt_and_inv(G: torch.Tensor, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^1/2, G^-1/2) of a symmetric PSD matrix, regularised by rel_eps * mean eigenvalue."""
    w, V = torch.linalg.eigh(G)
    w = w.clamp_min(0) + rel_eps * float(w.clamp_min(0).mean()) + 1e-30
    return (V * w.sqrt()) @ V.T, (V / w.sqrt()) @ V.T


@torch.no_grad()
def compress_layer(attn, cov: torch.Tensor, cfg, kv_heads: int, weighted: bool = True) -> dict[str, float]:
    """Rewrite one attention module's q/k/v/o projections for ``kv_heads`` KV heads. Returns the
    share of the key and value activation energy the new heads keep (1.0 = lossless; with
    ``weighted`` the energy as the weighting measures it: what reaches the scores and the output).

    ``weighted`` (default): each head's error is weighted by what reads it. A value error Δv_j
    reaches the output as W_o,q Δv_j for the query heads q of j, so values are compressed by PCA of
    M v with M = blockdiag((Σ_q W_o,qᵀ W_o,q)^1/2) and read back through M⁻¹ (still folded into
    o_proj); a key error Δz_j at rotary frequency i reaches a score as Re(q_i conj(Δz_j)), so the
    group's complex keys are scaled by s_j = (Σ_q E|q_q,i|²)^1/2 before the rank-1 PCA and the
    coefficients divided by it after. Without it: plain PCA of the activations (the first build)."""
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    g, r, half = hkv // kv_heads, hq // hkv, d // 2
    Aq, Ak, Av = _augmented(attn.q_proj), _augmented(attn.k_proj), _augmented(attn.v_proj)
    Wo0 = attn.o_proj.weight.detach().double()  # (D, hq * d)
    Wo = Wo0.clone()
    new_k = torch.zeros(kv_heads * d, Ak.shape[1], dtype=torch.float64)
    new_v = torch.zeros(kv_heads * d, Av.shape[1], dtype=torch.float64)
    new_q = Aq.clone()
    covc = cov.to(torch.complex128)
    kept_k, kept_v = [], []
    for n in range(kv_heads):
        heads = range(n * g, (n + 1) * g)
        # values: PCA of the stacked heads' activations (weighted by what o_proj reads of each head)
        A = Av[n * g * d : (n + 1) * g * d]  # (g d, D + 1)
        M = torch.eye(g * d, dtype=torch.float64)
        Minv = torch.eye(g * d, dtype=torch.float64)
        if weighted:
            for gj, j in enumerate(heads):
                cols = torch.cat([Wo0[:, q * d : (q + 1) * d] for q in range(j * r, (j + 1) * r)], 0)  # (r D, d)
                sl = slice(gj * d, (gj + 1) * d)
                M[sl, sl], Minv[sl, sl] = _sqrt_and_inv(cols.T @ cols)
        U, share = _top_eigvecs(M @ A @ cov @ A.T @ M.T, d)  # (g d, d)
        kept_v.append(share)
        new_v[n * d : (n + 1) * d] = U.T @ M @ A
        B = Minv @ U  # v ≈ B v'
        for gj, j in enumerate(heads):
            Bj = B[gj * d : (gj + 1) * d]  # (d, d): v_j ≈ Bj v'
            for q in range(j * r, (j + 1) * r):
                Wo[:, q * d : (q + 1) * d] = Wo0[:, q * d : (q + 1) * d] @ Bj
        # keys: per rotary frequency, complex rank-1 over the group's heads
        energy_kept, energy = 0.0, 0.0
        for i in range(half):
            Z = torch.stack([torch.complex(Ak[j * d + i], Ak[j * d + i + half]) for j in heads])  # (g, D + 1)
            s = torch.ones(g, dtype=torch.float64)
            if weighted:
                for gj, j in enumerate(heads):
                    Q = torch.stack([torch.complex(Aq[q * d + i], Aq[q * d + i + half]) for q in range(j * r, (j + 1) * r)])
                    s[gj] = torch.einsum("qa,ab,qb->", Q, covc, Q.conj()).real.clamp_min(0).sqrt()
                s = s + 1e-6 * float(s.mean()) + 1e-30
            Zs = s[:, None].to(Z.dtype) * Z
            C = Zs @ covc @ Zs.conj().T  # (g, g) Hermitian: E[z̃ z̃ᴴ]
            w, V = torch.linalg.eigh(C)
            u = V[:, -1]  # (g,) unit
            energy_kept += float(w[-1].clamp_min(0))
            energy += float(w.clamp_min(0).sum())
            zp = (u.conj()[:, None] * Zs).sum(0)  # new key row z' = ũᴴ S z
            new_k[n * d + i], new_k[n * d + i + half] = zp.real, zp.imag
            for gj, j in enumerate(heads):
                c = (u[gj] / s[gj]).conj()  # z_j ≈ (ũ_j / s_j) z'
                for q in range(j * r, (j + 1) * r):
                    zq = torch.complex(Aq[q * d + i], Aq[q * d + i + half]) * c
                    new_q[q * d + i], new_q[q * d + i + half] = zq.real, zq.imag
        kept_k.append(energy_kept / max(energy, 1e-30))
    attn.q_proj, attn.k_proj, attn.v_proj = _set(attn.q_proj, new_q), _set(attn.k_proj, new_k), _set(attn.v_proj, new_v)
    attn.o_proj.weight.copy_(Wo.to(attn.o_proj.weight.dtype))
    return {"keys": sum(kept_k) / len(kept_k), "values": sum(kept_v) / len(kept_v)}


def compress_kv_heads(model, windows: torch.Tensor, kv_heads: int, weighted: bool = True,
                      error_windows: int = 2) -> list[dict[str, float]]:
    """Compress every layer of ``model`` (a slimlm CausalLM, float) in place to ``kv_heads`` KV heads;
    the config is updated. Returns per layer the activation energy kept for keys and values and
    ``error``: the attention output's relative error ||a' - a|| / ||a|| on the first
    ``error_windows`` calibration windows (each layer fed the original model's inputs)."""
    cfg = model.cfg
    check_kv_heads(cfg, kv_heads)
    covs = input_covariances(model, windows)
    layers = list(model.model.layers)
    captured: dict[int, tuple] = {}
    if error_windows:
        handles = []

        def hook(i):
            def f(_m, args, out):
                captured[i] = (tuple(a.clone() if torch.is_tensor(a) else a for a in args), out.detach().clone())
            return f

        try:
            for i, layer in enumerate(layers):
                handles.append(layer.self_attn.register_forward_hook(hook(i)))
            with torch.no_grad():
                model(windows[:error_windows].to(model.device))
        finally:
            for h in handles:
                h.remove()
    stats = []
    for i, (layer, cov) in enumerate(zip(layers, covs)):
        st = compress_layer(layer.self_attn, cov, cfg, kv_heads, weighted=weighted)
        if i in captured:
            args, ref = captured.pop(i)
            with torch.no_grad():
                out = layer.self_attn(*args)
            st["error"] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        stats.append(st)
    cfg.num_kv_heads = kv_heads
    return stats
