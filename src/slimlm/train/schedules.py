"""Learning-rate schedules: pure functions of the step, chosen by name.

Conventions for every formula below: s = 0, 1, ... is the index of the optimizer update, N the
total number of updates, W the warm-up updates, lr the peak. A phase over updates [a, b) uses the
progress p = (s + 1 - a) / (b - a) in (0, 1], so its first update already moves and its last one
lands on the phase's end value. ``decay(shape, p, r)`` goes from 1 at p = 0 to r at p = 1.

How to add a schedule: a frozen dataclass subclassing :class:`Schedule` with its fields (each
with a docstring), ``lr_at(s, h)`` written as the paper's formula, ``@SCHEDULES.register("name")``;
the parametrized test over ``SCHEDULES`` then checks it is finite, positive and starts low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from slimlm.errors import SlimLMError
from slimlm.registry import Registry

DECAY_SHAPES = ("linear", "cosine", "exponential", "1-sqrt")


def decay(shape: str, p: float, r: float) -> float:
    """Multiplier from 1 (p = 0) to r (p = 1).

    linear: 1 - (1 - r) p;  cosine: r + (1 - r)(1 + cos(pi p)) / 2 (Loshchilov & Hutter, 2017);
    exponential: r^p (MiniCPM's exponential decay, Hu et al., 2024; needs r > 0);
    1-sqrt: r + (1 - r)(1 - sqrt(p)) (Hägele et al., 2024, "Scaling laws and compute-optimal
    training beyond fixed training durations").
    """
    p = min(max(p, 0.0), 1.0)
    if shape == "linear":
        return 1 - (1 - r) * p
    if shape == "cosine":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
    if shape == "exponential":
        return r**p
    if shape == "1-sqrt":
        return r + (1 - r) * (1 - math.sqrt(p))
    raise SlimLMError(f"unknown decay shape '{shape}'; known: {', '.join(DECAY_SHAPES)}")


def progress(s: int, start: int, end: int) -> float:
    return (s + 1 - start) / max(1, end - start)


class Horizon(NamedTuple):
    """What a schedule may know about the run besides the step."""

    total_steps: int
    tokens_per_step: int = 1
    sequences_per_step: int = 1


@dataclass(frozen=True)
class Schedule:
    lr: float = 3e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warm-up updates from 0 to lr (Goyal et al., 2017)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0:
            raise SlimLMError(f"{type(self).__name__}: need lr > 0 and warmup_steps >= 0")
        for name in ("decay_shape", "anneal_shape"):
            shape = getattr(self, name, None)
            if shape is not None:
                decay(shape, 0.0, 0.5)  # validates the name
            if shape == "exponential" and getattr(self, "min_lr_ratio", 1) <= 0:
                raise SlimLMError(f"{type(self).__name__}: exponential decay needs min_lr_ratio > 0")

    def warm(self, s: int) -> float:
        """lr * (s + 1) / W for s < W."""
        return self.lr * (s + 1) / self.warmup_steps

    def lr_at(self, s: int, h: Horizon) -> float:
        raise NotImplementedError

    def __call__(self, s: int, h: Horizon) -> float:
        return self.lr_at(s, h)


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


@SCHEDULES.register("constant")
@dataclass(frozen=True)
class Constant(Schedule):
    """lr(s) = lr * (s + 1) / W for s < W, then lr."""

    def lr_at(self, s: int, h: Horizon) -> float:
        return self.warm(s) if s < self.warmup_steps else self.lr


@SCHEDULES.register("cosine")
@dataclass(frozen=True)
class Cosine(Schedule):
    """Warm-up, then cosine decay to r * lr at the last update (Loshchilov & Hutter, 2017, SGDR;
    the GPT-3 / Chinchilla default): lr(s) = lr * decay("cosine", p, r), p = (s + 1 - W) / (N - W)."""

    min_lr_ratio: float = 0.1
    """r: final lr / peak lr (0.1 in Chinchilla, Hoffmann et al., 2022)."""

    def lr_at(self, s: int, h: Horizon) -> float:
        if s < self.warmup_steps:
            return self.warm(s)
        return self.lr * decay("cosine", progress(s, self.warmup_steps, h.total_steps), self.min_lr_ratio)


@SCHEDULES.register("wsd")
@dataclass(frozen=True)
class WSD(Schedule):
    """Warmup-Stable-Decay (MiniCPM, Hu et al., 2024, Sec. 4):
    lr(s) = lr (s + 1) / W for s < W;  lr for W <= s < S;  lr * decay(shape, p, r) for s >= S,
    p = (s + 1 - S) / (N - S), with S = decay_start, or N - round(decay_fraction * N).
    Any stable-phase checkpoint can branch its own decay: resume it with decay_start = its step
    and N = decay_start + the decay length (the stable phase does not depend on N)."""

    decay_fraction: float = 0.2
    """Share of the updates spent decaying (10-20% in MiniCPM; Hägele et al., 2024 use 20%)."""
    decay_start: int | None = None
    """Update at which the decay starts; overrides decay_fraction (to branch from a checkpoint)."""
    decay_shape: str = "1-sqrt"
    """linear, cosine, exponential (MiniCPM) or 1-sqrt (best in Hägele et al., 2024)."""
    min_lr_ratio: float = 0.0
    """r: lr at the end of the decay / peak lr."""

    def decay_begins(self, total: int) -> int:
        return self.decay_start if self.decay_start is not None else total - round(self.decay_fraction * total)

    def lr_at(self, s: int, h: Horizon) -> float:
        start = self.decay_begins(h.total_steps)
        if s < min(self.warmup_steps, start):
            return self.warm(s)
        if s < start:
            return self.lr
        return self.lr * decay(self.decay_shape, progress(s, start, h.total_steps), self.min_lr_ratio)


@SCHEDULES.register("power")
@dataclass(frozen=True)
class Power(Schedule):
    """Power scheduler (Shen et al., 2024, "Power Scheduler: a batch size and token number
    agnostic learning rate scheduler"): with n the tokens seen after update s, n_s = (s + 1) * tokens_per_step,
    and batch size beta,  lr_p(n) = min(lr, beta * a * n^b);
    lr(s) = (s + 1) / W * lr_p(n_W) for s < W;  lr_p(n_s) for W <= s < S;
    decay(shape, p, r) * lr_p(n_S) for s >= S, S = N - round(decay_fraction * N)."""

    a: float = 4.0
    """Amplitude of the power law (the paper's a = 4)."""
    b: float = -0.51
    """Exponent of the power law (the paper's b = -0.51)."""
    batch_unit: str = "sequences"
    """beta counted in 'sequences' per update or in 'tokens' per update."""
    decay_fraction: float = 0.1
    """Share of updates in the final decay."""
    decay_shape: str = "exponential"
    """Shape of the final decay (see ``decay``)."""
    min_lr_ratio: float = 0.01
    """r: lr at the end / lr at the decay start."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_unit not in ("sequences", "tokens"):
            raise SlimLMError(f"power: batch_unit must be 'sequences' or 'tokens', got '{self.batch_unit}'")

    def power(self, n: float, h: Horizon) -> float:
        beta = h.sequences_per_step if self.batch_unit == "sequences" else h.tokens_per_step
        return min(self.lr, beta * self.a * n**self.b)

    def lr_at(self, s: int, h: Horizon) -> float:
        start = h.total_steps - round(self.decay_fraction * h.total_steps)
        tps = h.tokens_per_step
        if s < min(self.warmup_steps, start):
            return (s + 1) / self.warmup_steps * self.power(self.warmup_steps * tps, h)
        if s < start:
            return self.power((s + 1) * tps, h)
        p = progress(s, start, h.total_steps)
        return decay(self.decay_shape, p, self.min_lr_ratio) * self.power(max(start, 1) * tps, h)


@SCHEDULES.register("infinite")
@dataclass(frozen=True)
class Infinite(Schedule):
    """Infinite schedule (Ibrahim et al., 2024, "Simple and scalable strategies to continually
    pre-train LLMs", Sec. 7; Garg et al., 2024): warm-up; cool-down over C updates,
    lr_c + (lr - lr_c)(1 + cos(pi p)) / 2 with lr_c = const_lr_ratio * lr; a constant lr_c for
    as long as training goes; and an anneal from any checkpoint, lr_c * decay(shape, p, r) for
    s >= A, A = anneal_start or N - round(anneal_fraction * N). Without a fixed budget, new
    data continues from the constant phase without re-warming."""

    cooldown_steps: int = 0
    """C: updates from the peak down to the constant lr."""
    const_lr_ratio: float = 0.5
    """lr_c / lr during the constant phase."""
    anneal_fraction: float = 0.1
    """Share of updates in the final anneal."""
    anneal_start: int | None = None
    """Update at which the anneal starts; overrides anneal_fraction (to anneal a checkpoint)."""
    anneal_shape: str = "exponential"
    """Shape of the anneal (the paper anneals exponentially)."""
    min_lr_ratio: float = 0.02
    """r: final lr / lr_c."""

    def lr_at(self, s: int, h: Horizon) -> float:
        anneal = self.anneal_start if self.anneal_start is not None else h.total_steps - round(self.anneal_fraction * h.total_steps)
        const = self.lr * self.const_lr_ratio
        if s >= anneal:
            return const * decay(self.anneal_shape, progress(s, anneal, h.total_steps), self.min_lr_ratio)
        if s < self.warmup_steps:
            return self.warm(s)
        if s < self.warmup_steps + self.cooldown_steps:
            p = progress(s, self.warmup_steps, self.warmup_steps + self.cooldown_steps)
            return self.lr * decay("cosine", p, self.const_lr_ratio)
        return const


@SCHEDULES.register("rewarm")
@dataclass(frozen=True)
class Rewarm(Schedule):
    """Re-warming and re-decaying for continual pre-training (Gupta et al., 2023, "Continual
    pre-training of large language models: how to (re)warm your model?"; Ibrahim et al., 2024):
    lr(s) = start_lr + (lr - start_lr)(s + 1) / W for s < W, then lr * decay(shape, p, r),
    p = (s + 1 - W) / (N - W): up from the pre-trained model's final lr, then down again."""

    start_lr: float = 0.0
    """Where the re-warm starts (the previous run's final lr; 0 re-warms from zero)."""
    decay_shape: str = "cosine"
    """Shape of the re-decay (cosine in both papers)."""
    min_lr_ratio: float = 0.1
    """r: final lr / peak lr."""

    def lr_at(self, s: int, h: Horizon) -> float:
        if s < self.warmup_steps:
            return self.start_lr + (self.lr - self.start_lr) * (s + 1) / self.warmup_steps
        return self.lr * decay(self.decay_shape, progress(s, self.warmup_steps, h.total_steps), self.min_lr_ratio)


def horizon_warnings(s: Schedule, total_steps: int) -> list[str]:
    """What is wrong with running ``s`` for ``total_steps`` updates (shortened runs): a warm-up
    that fills the run, or a decay that would start inside the warm-up."""
    out = []
    if s.warmup_steps >= total_steps:
        out.append(f"schedule.warmup_steps {s.warmup_steps} >= the run's {total_steps} updates: the whole run is "
                   f"warm-up and the lr never reaches its peak {s.lr:g}; lower schedule.warmup_steps")
    start = None
    if isinstance(s, WSD):
        start = s.decay_begins(total_steps)
    elif isinstance(s, Power):
        start = total_steps - round(s.decay_fraction * total_steps)
    if start is not None and start < s.warmup_steps < total_steps:
        out.append(f"the decay starts at update {start}, inside the warm-up (schedule.warmup_steps "
                   f"{s.warmup_steps}): the lr decays before reaching its peak; lower schedule.warmup_steps")
    return out
