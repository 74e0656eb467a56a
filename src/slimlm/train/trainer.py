"""The training loop: pre-training and continual pre-training of one model.

    Trainer(cfg).fit()

One update = ``grad_accum`` micro-batches per rank. The loss is the mean over every target token
of the update across micro-batches and ranks (each micro-batch's summed loss is divided by the
update's global target count), so accumulation and data parallelism give the same update as one
big batch. The learning rate is set before each update from the schedule, a pure function of the
update index; an update whose loss or gradient norm is not finite is skipped and reported.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from slimlm.data.packing import IGNORE, Batch
from slimlm.errors import SlimLMError
from slimlm.train import build, checkpoint, distributed, doc_attention, sharded_checkpoint
from slimlm.train.config import TrainConfig, schedule_name, technique_changes
from slimlm.train.interrupt import StopSignals
from slimlm.train.metrics import MetricsLog
from slimlm.train.moe_balance import LoadBalance
from slimlm.train.galore import state_bytes
from slimlm.train.optimizers import build_optimizer
from slimlm.train.presets import count_params
from slimlm.train.schedules import Horizon, horizon_warnings
from slimlm.train.token_mixture import mixture_loss_sum


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets (ignored targets excluded)."""
    logits = model(batch.input_ids, batch.position_ids, segment_ids=batch.segment_ids)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum")


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool


class Trainer:
    def __init__(self, cfg: TrainConfig, objective=None, adapt=None):
        """``objective(forward, batch, step) -> summed loss`` replaces the LM loss of updates (held-out
        evaluation stays the LM loss); ``adapt(model)`` changes the model (adapters, frozen weights)
        before it is wrapped and its optimizer built. Both are how ``slimlm.compress`` runs here."""
        self.cfg, self.objective, self.adapt = cfg, objective, adapt
        self.full_model = None
        torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
        self.world = distributed.init_world(cfg.dist, cfg.train.device)
        self.out = Path(cfg.out_dir)
        self.sets = build.train_datasets(cfg)
        self.model, self.tokenizer = build.build_model(cfg, self.sets[0])
        if adapt is not None:
            adapt(self.model)
        self.model.to(self.world.device)
        if cfg.train.attention == "flex" and self.world.device.type != "cuda":
            raise SlimLMError("train.attention 'flex' needs CUDA: flex_attention has no backward on the CPU in "
                              "torch " + torch.__version__.split("+")[0] + "; use train.attention 'varlen'")
        doc_attention.install(self.model, cfg.train.attention)  # the document-mask path (train/doc_attention.py)
        self.wrapped = distributed.wrap(self.model, self.world, cfg.dist.strategy)
        self.forward = torch.compile(self.wrapped) if cfg.train.compile else self.wrapped
        self.optimizer = build_optimizer(self.wrapped, cfg.optim, self.model.cfg)
        self.balance = LoadBalance(self.model, cfg.model.moe.balance, cfg.model.moe.aux_loss_weight, self.world)
        self.extra: dict[str, float] = {}
        """Technique metrics of the last update (MoE balancing loss and load entropy)."""
        self.loader = build.batch_source(cfg, self.sets, self.world)
        self.val = build.val_loaders(cfg, self.world, self.say)
        if hasattr(self.loader, "attention_cost"):  # varlen: what Dataset Decomposition saves
            self.say(f"slimlm: varlen buckets keep {self.loader.kept_fraction:.1%} of the tokens; attention work "
                     f"{self.loader.attention_cost:.1%} of fixed {cfg.data.seq_len}-token rows")
        d = cfg.data
        per_micro = d.micro_batch * d.seq_len * self.world.size
        self.horizon = Horizon(cfg.train.steps, per_micro * cfg.train.grad_accum,
                               d.micro_batch * self.world.size * cfg.train.grad_accum)
        self.step, self.tokens, self.skipped, self.budget_fixed = 0, 0, 0, False
        self.checkpoint: Path | None = None
        """The newest checkpoint of this run (written or resumed from)."""
        self.interrupted = ""
        """Name of the signal (SIGINT / SIGTERM) that stopped fit() early, else empty."""
        resumed = self._resume()
        self.finished = resumed and self.step >= self.horizon.total_steps
        """The run in out_dir had already reached its horizon before this process started."""
        if self.budget_fixed or not cfg.train.time_budget_minutes:  # else: once the budget fixes the horizon
            self._warn_horizon()
        self.metrics = MetricsLog(self.out, self.step if resumed else None, cfg.log.tensorboard) if self.world.main else None

    def say(self, msg: str) -> None:
        if self.world.main:
            log(msg)

    # ------------------------------------------------------------------ resume / save
    def _resume(self) -> bool:
        ck = self.cfg.checkpoint
        if ck.resume_from:
            path = Path(ck.resume_from)
        elif ck.resume:
            path = checkpoint.latest_good(checkpoint.checkpoint_root(self.out), self.say)
            if path is None:
                return False
        else:
            return False
        state = checkpoint.load_checkpoint(path)
        if not state.sharded:
            state.model_state = checkpoint.with_tied_names(self.model, state.model_state)
        diff = checkpoint.same_shape(state.model_cfg, self.model.cfg)
        if diff:
            raise SlimLMError(f"checkpoint {path} is from another model shape ({diff}); use another out_dir")
        changed = technique_changes(state.trainer.get("config", {}), self.cfg.to_dict())
        if changed and not ck.allow_config_change:
            raise SlimLMError(f"checkpoint {path} was trained with other technique settings ({'; '.join(changed)}); "
                              "resume with the same settings, or pass --allow-config-change")
        fresh_optimizer = any(c.startswith("optim.") for c in changed)  # allowed above: another optimizer's state does not fit
        if fresh_optimizer:
            self.say("slimlm: warning: the optimizer changed; its state starts fresh (weights and data position resume)")
        if state.sharded:  # torch.distributed.checkpoint shards, resharded onto this run's processes
            sharded_checkpoint.load(path, self.wrapped, None if fresh_optimizer else self.optimizer)
        elif fresh_optimizer:
            distributed.load_full_model_state(self.wrapped, state.model_state)
        else:
            distributed.load_full_states(self.wrapped, self.optimizer, state.model_state, state.optimizer)
        t = state.trainer
        self.step, self.tokens, self.skipped = int(t["step"]), int(t["tokens"]), int(t.get("skipped", 0))
        self.loader.load_state_dict(t["data"])
        torch.set_rng_state(state.rng["torch"])
        if "cuda" in state.rng and torch.cuda.is_available():  # saved since checkpoints began; now restored too
            cuda_states = state.rng["cuda"]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
            else:
                self.say(f"slimlm: warning: checkpoint has {len(cuda_states)} CUDA RNG states for "
                         f"{torch.cuda.device_count()} visible GPUs; CUDA RNG not restored")
        if t.get("budget_fixed"):  # a time budget fixed the horizon: keep it
            self.horizon, self.budget_fixed = self.horizon._replace(total_steps=int(t["total_steps"])), True
        self.checkpoint = path
        self.say(f"slimlm: resumed from {path} at update {self.step}")
        return True

    def _warn_horizon(self) -> None:
        for w in horizon_warnings(self.cfg.schedule, self.horizon.total_steps):
            self.say(f"slimlm: warning: {w}")

    def save(self) -> Path | None:
        if self.cfg.checkpoint.sharded and self.world.distributed:  # every rank writes its shards, no gather
            self.checkpoint = sharded_checkpoint.save(checkpoint.checkpoint_root(self.out), self.wrapped, self.optimizer,
                                                      self._trainer_state(), self.model.cfg, self.tokenizer,
                                                      self.cfg.checkpoint.keep_last, self.world)
            return self.checkpoint
        msd, osd = distributed.full_states(self.wrapped, self.optimizer)
        path = None
        if self.world.main:
            model = self.model
            if self.cfg.dist.strategy == "fsdp2" and self.world.distributed:
                from slimlm.model.weights import build_model

                model = build_model(self.model.cfg.replace(), msd) if self.adapt is None else self._adapted(msd)
                self.full_model = model  # the unsharded copy of the last save (compress writes its exports from it)
            path = checkpoint.save_checkpoint(checkpoint.checkpoint_root(self.out), model, osd, self._trainer_state(),
                                              self.tokenizer, self.cfg.checkpoint.keep_last)
        distributed.barrier(self.world)
        self.checkpoint = path if path is not None else self.checkpoint
        return path

    def _adapted(self, msd: dict) -> torch.nn.Module:
        """A plain copy of the adapted model (adapters, distillation projection, factors) holding ``msd``."""
        from slimlm.model.transformer import CausalLM

        model = CausalLM(self.model.cfg.replace())
        self.adapt(model)
        model.load_state_dict(msd)
        return model

    def _trainer_state(self) -> dict:
        return {
            "step": self.step, "tokens": self.tokens, "skipped": self.skipped,
            "total_steps": self.horizon.total_steps, "budget_fixed": self.budget_fixed,
            "data": self.loader.state_dict(), "schedule": schedule_name(self.cfg.schedule),
            "config": self.cfg.to_dict(),
        }

    # ------------------------------------------------------------------ one update
    def update(self) -> UpdateResult:
        cfg, world = self.cfg, self.world
        batches = [self.loader.next_batch().to(world.device) for _ in range(cfg.train.grad_accum)]
        n_local = sum(b.target_tokens for b in batches)
        n_global, routed = distributed.all_reduce_sum(
            [float(n_local), float(sum(b.computed_tokens for b in batches))], world)
        total, aux = torch.zeros((), device=world.device), torch.zeros((), device=world.device)
        if self.balance.active:
            self.balance.begin_update(routed, len(batches))
        for i, b in enumerate(batches):
            sync = i == len(batches) - 1 or not hasattr(self.wrapped, "no_sync")
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                with build.autocast(cfg.train.precision, world.device):
                    s = self._objective(b)
                    a = self.balance.loss() if self.balance.active else None
                obj = s * (world.size / max(n_global, 1.0))
                (obj if a is None else obj + a).backward()
            total += s.detach()
            if a is not None:
                aux += a.detach().float()
        if self.balance.active:
            (a_sum,) = distributed.all_reduce_sum([aux.item()], world)
            self.extra = {"moe_aux_loss": a_sum / world.size, "moe_load_entropy": self.balance.load_entropy()}
        loss_total, computed = distributed.all_reduce_sum(
            [total.item(), float(sum(b.computed_tokens for b in batches))], world)
        loss = loss_total / max(n_global, 1.0)
        lr = self.cfg.schedule(self.step, self.horizon)
        grad_norm = self._clip()
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.skipped += 1
            self.say(f"slimlm: update {self.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                     f"({loss if not math.isfinite(loss) else grad_norm}); update skipped")
        else:
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)  # μP's per-layer multipliers (model/mup.py), else 1
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(computed)
        return UpdateResult(loss, grad_norm, lr, int(computed), skipped)

    def _objective(self, b: Batch) -> torch.Tensor:
        """The summed training loss of one micro-batch: a given objective (distillation), else
        the configured token-prediction mixture, else plain next-token loss."""
        if self.objective is not None:
            return self.objective(self.forward, b, self.step)
        o = self.cfg.objective
        if o.plain and o.next_token == 1.0:
            return loss_sum(self.forward, b)
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.step)  # resumable: a function of the step
        return mixture_loss_sum(self.forward, b, o.next_token, o.next_all, o.random_position, o.horizon, gen)

    def _clip(self) -> float:
        params = [p for p in self.wrapped.parameters() if p.grad is not None]
        clip = self.cfg.optim.clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.wrapped.eval()
        out = {}
        for name, loader in self.val.items():
            loader.load_state_dict({"rows": 0, "cursors": [0]})
            s = n = 0.0
            for _ in range(self.cfg.log.eval_batches):
                b = loader.next_batch().to(self.world.device)
                with build.autocast(self.cfg.train.precision, self.world.device):
                    s += loss_sum(self.forward, b).item()
                n += b.target_tokens
            s, n = distributed.all_reduce_sum([s, n], self.world)
            out[f"val_loss/{name}"] = s / max(n, 1.0)
            out[f"val_ppl/{name}"] = math.exp(min(s / max(n, 1.0), 50.0))
        self.wrapped.train()
        return out

    # ------------------------------------------------------------------ the loop
    def fit(self, max_updates: int | None = None) -> dict[str, float]:
        """Train to the horizon (or ``max_updates`` more updates); returns the last metrics."""
        cfg = self.cfg
        self.say(f"slimlm: {count_params(self.model) / 1e6:.1f}M params, {self.horizon.tokens_per_step:,} tokens/update, "
                 f"{self.world.size} process(es) on {self.world.device}, schedule {schedule_name(cfg.schedule)}")
        last: dict[str, float] = {}
        if cfg.log.eval_at_start and self.step == 0 and self.val:
            last = self.evaluate()
            self._record({"step": 0, **last})
        bar = tqdm(total=self.horizon.total_steps, initial=self.step, unit="upd", file=sys.stderr,
                   disable=not (self.world.main and cfg.log.progress), dynamic_ncols=True)
        with StopSignals() as stop:
            last = self._loop(max_updates, bar, stop, last)
        bar.close()
        return last

    def _loop(self, max_updates: int | None, bar: tqdm, stop: StopSignals, last: dict[str, float]) -> dict[str, float]:
        cfg = self.cfg
        done_here, t_probe, tok_probe = 0, 0.0, 0
        t_last, tok_last = time.perf_counter(), self.tokens
        while self.step < self.horizon.total_steps and (max_updates is None or done_here < max_updates):
            t0 = time.perf_counter()
            r = self.update()
            dt = time.perf_counter() - t0
            done_here += 1
            if done_here == 1:  # optimizer state exists from the first step on (GaLore: its memory saving)
                nbytes = state_bytes(self.optimizer)
                self._record({"step": self.step, "optim_state_bytes": nbytes})
                self.say(f"slimlm: optimizer state {nbytes / 2**20:.1f} MiB on this process")
            if done_here > 1:  # the first update of a process pays for warm-up
                t_probe, tok_probe = t_probe + dt, tok_probe + r.tokens
            if cfg.train.time_budget_minutes and not self.budget_fixed and done_here >= cfg.train.budget_probe_steps:
                self._fix_budget(tok_probe / max(t_probe, 1e-9))
                bar.total = self.horizon.total_steps
            now = time.perf_counter()
            tps = (self.tokens - tok_last) / max(now - t_last, 1e-9)
            bar.set_postfix(loss=f"{r.loss:.3f}", lr=f"{r.lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            last = {"loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": self.tokens, "tok_per_s": tps,
                    **self.extra}
            if self.step % cfg.log.every == 0 or self.step == self.horizon.total_steps:
                self._record({"step": self.step, **last, "skipped": self.skipped})
                t_last, tok_last = now, self.tokens
            is_end = self.step == self.horizon.total_steps
            if self.val and ((cfg.log.eval_every and self.step % cfg.log.eval_every == 0) or is_end):
                ev = self.evaluate()
                last.update(ev)
                self._record({"step": self.step, **ev})
            saved = (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or is_end
            if saved:
                self.save()
            if self._stop_requested(stop):  # SIGINT / SIGTERM: keep this update, then stop
                if not saved:
                    self.save()
                self.interrupted = stop.name or "signal"
                break
        return last

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether any rank received a stop signal (all ranks stop at the same update)."""
        (n,) = distributed.all_reduce_sum([float(stop.received is not None)], self.world)
        if n and not stop.received:
            stop.received = 15  # another rank's SIGTERM (torchrun forwards signals to every worker)
        return n > 0

    def _fix_budget(self, tokens_per_s: float) -> None:
        (tps,) = distributed.all_reduce_sum([tokens_per_s / self.world.size], self.world)
        budget_s = self.cfg.train.time_budget_minutes * 60
        steps = max(self.step + 1, int(budget_s * tps / self.horizon.tokens_per_step))
        self.horizon, self.budget_fixed = self.horizon._replace(total_steps=steps), True
        self.say(f"slimlm: time budget {self.cfg.train.time_budget_minutes:g} min at {tps:,.0f} tokens/s measured "
                 f"-> {steps:,} updates ({steps * self.horizon.tokens_per_step / 1e6:.2f}M tokens)")
        self._warn_horizon()

    def _record(self, rec: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(rec)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.wrapped = self.forward = None  # DDP's reducer holds the process group: release it first
        gc.collect()
        distributed.shutdown(self.world)
