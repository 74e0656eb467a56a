"""LAMB against the paper's update rule (You et al., 2020, Algorithm 2), written out in numpy."""

from __future__ import annotations

import numpy as np
import torch

from slimlm.train.lamb import Lamb


def reference_lamb(x, grads, lr, b1, b2, eps, wd, max_trust=10.0):
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        u = m_hat / (np.sqrt(v_hat) + eps) + wd * x
        xn, un = np.linalg.norm(x), np.linalg.norm(u)
        trust = min(xn, max_trust) / un if xn > 0 and un > 0 else 1.0
        x = x - lr * trust * u
    return x


def test_lamb_matches_algorithm_2():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 7))
    grads = [rng.normal(size=(5, 7)) * (i + 1) for i in range(4)]
    p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = Lamb([p], lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    want = reference_lamb(x0, grads, 0.05, 0.9, 0.99, 1e-6, 0.01)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    # unlike Adam, the step size follows the layer's weight norm: scaling x scales the step
    q = torch.nn.Parameter(torch.tensor(x0 * 3))
    opt2 = Lamb([q], lr=0.05, betas=(0.9, 0.99), eps=1e-6, max_trust=100.0)
    q.grad = torch.tensor(grads[0])
    opt2.step()
    step_small = reference_lamb(x0, grads[:1], 0.05, 0.9, 0.99, 1e-6, 0.0, max_trust=100.0) - x0
    np.testing.assert_allclose(q.detach().numpy() - x0 * 3, 3 * step_small, rtol=1e-4)


def test_zero_weights_take_the_plain_adam_direction():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    p.grad = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), -0.1 * np.sign([1.0, -2.0, 3.0, -4.0]), rtol=1e-6)
    state = opt.state_dict()["state"][0]
    assert float(state["step"]) == 1 and state["exp_avg"].shape == (4,)
