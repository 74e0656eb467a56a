"""Knowledge distillation as a trainer objective.

    loss = kl_weight * KL(teacher || student at temperature T) * T^2       (Hinton et al., 2015)
         + lm_weight * cross-entropy with the data's next tokens
         + hidden_weight * MSE(student hidden states, teacher hidden states) (Minitron sec. 3, PELA)

summed over the batch's target tokens, as the trainer's LM loss is, so accumulation and data
parallelism normalise it the same way. The teacher runs in ``no_grad`` on the same batch; the
student is the run's model (``model.init_from``, e.g. a pruned directory). After
``teacher_until_step`` updates the teacher is switched off and the loss is the plain LM loss
(SALT, Rawat et al., 2024). The objective holds no state of its own: a killed run resumes through
the trainer's checkpoints and continues step for step.

The hidden-state loss compares the residual stream after student layer i with the one after its
teacher layer. For a student made by ``slimlm prune`` the pairing is exact and needs no learned
projection: ``prune_report.json`` names the teacher layer each student layer came from and the
residual channels kept (pruning leaves the kept channels' values unchanged). Otherwise layers pair
evenly (student i <-> teacher round((i + 1) * Lt / Ls) - 1) and, when the widths differ (or
``projection = "learned"``), each student layer's state goes through a learned linear map to the
teacher's width (PELA's feature distillation, Minitron's intermediate-state loss with a projection):
the maps live on the student as ``distill_proj`` (so they train, checkpoint, resume and sync under
DDP like its weights) and are dropped from ``out_dir/final``, the distilled model.

With ``topk_cache`` the KL uses the teacher's top-k logits written offline by ``slimlm
distill-cache`` (``slimlm.compress.topk_cache``) instead of running the teacher.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.data.packing import IGNORE, Batch
from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM


@dataclass
class DistillConfig:
    teacher: str = ""
    """Known model name or HF directory of the teacher; it must share the student's tokenizer."""
    temperature: float = 1.0
    """Softmax temperature of both distributions; the KL is scaled by T^2 (Hinton et al., 2015)."""
    kl_weight: float = 1.0
    """Weight of the logit KL (Minitron distils with the logit loss alone: weight 1, LM weight 0)."""
    lm_weight: float = 0.0
    """Weight of the plain next-token cross-entropy mixed in."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE (Minitron's intermediate-state loss, PELA's feature distillation)."""
    top_k: int = 0
    """If > 0, the KL over the teacher's top-k tokens only (both renormalised over them)."""
    teacher_until_step: int = 0
    """SALT: distil for this many updates, then train on the LM loss alone (0: teacher throughout)."""
    projection: str = "auto"
    """Hidden-state loss: 'auto' (a pruned student's kept channels, the identity for equal widths, else
    a learned linear map per layer) or 'learned' (always a learned map to the teacher's width)."""
    topk_cache: str = ""
    """Folder written by `slimlm distill-cache`: the KL over the cached teacher top-k logits (needs
    top_k = the cache's k); the teacher is not run unless hidden_weight > 0."""
    lowrank: bool = False
    """PELA recovery: the student is a `slimlm lowrank` output; train its factors (rebuilt from
    lowrank.json), not dense weights, and write the result to out_dir/final the same way."""

    def __post_init__(self) -> None:
        if not self.teacher:
            raise SlimLMError("distill.teacher is required: a known model name or HF directory")
        if self.temperature <= 0:
            raise SlimLMError(f"distill.temperature must be > 0, got {self.temperature}")
        for k in ("kl_weight", "lm_weight", "hidden_weight", "top_k", "teacher_until_step"):
            if getattr(self, k) < 0:
                raise SlimLMError(f"distill.{k} must be >= 0, got {getattr(self, k)}")
        if self.projection not in ("auto", "learned"):
            raise SlimLMError(f"distill.projection must be 'auto' or 'learned', got '{self.projection}'")
        if self.topk_cache and not self.top_k:
            raise SlimLMError("distill.topk_cache needs distill.top_k (the k the cache was written with)")
        if self.kl_weight + self.lm_weight + self.hidden_weight == 0:
            raise SlimLMError("distill: kl_weight, lm_weight and hidden_weight are all 0; nothing to train")


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) || softmax(student / T)) * T^2; inputs (N, V)."""
    if top_k:
        values, idx = teacher.float().topk(min(top_k, teacher.shape[-1]), dim=-1)  # (N, k)
        return kl_topk_sum(student, values, idx, temperature)
    return _kl(student, teacher, temperature)


def kl_topk_sum(student: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KL over the teacher's top-k tokens: student (N, V), teacher values / token ids (N, k);
    both distributions renormalised over those k tokens (online or from the offline cache)."""
    return _kl(student.gather(-1, idx), values, temperature)


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * temperature**2


PROJ = "distill_proj"


def needs_projection(cfg: DistillConfig, student_cfg, teacher_cfg, student_dir: str | None) -> bool:
    if not cfg.hidden_weight:
        return False
    if cfg.projection == "learned":
        return True
    pruned = student_dir is not None and (Path(student_dir) / "prune_report.json").is_file()
    return not pruned and student_cfg.hidden_size != teacher_cfg.hidden_size


def add_projection(student: CausalLM, teacher_width: int, seed: int = 0) -> None:
    """Attach one learned (student width -> teacher width) map per student layer as ``student.distill_proj``;
    the identity (zero-padded) where it fits, so training starts from the plain MSE of the shared channels."""
    ds, n = student.cfg.hidden_size, student.cfg.num_layers
    maps = torch.nn.ModuleList(torch.nn.Linear(ds, teacher_width, bias=False) for _ in range(n))
    with torch.no_grad():
        for m in maps:
            m.weight.zero_()
            m.weight[: min(ds, teacher_width), : min(ds, teacher_width)].copy_(torch.eye(min(ds, teacher_width)))
    setattr(student, PROJ, maps.to(student.device))


def drop_projection(student: CausalLM) -> None:
    if hasattr(student, PROJ):
        delattr(student, PROJ)


def layer_pairs(student: CausalLM, teacher: CausalLM, student_dir: str | None) -> tuple[list[int], torch.Tensor | None]:
    """Teacher layer per student layer, and the teacher channels kept (None: all)."""
    report = Path(student_dir) / "prune_report.json" if student_dir else None
    ls, lt = student.cfg.num_layers, teacher.cfg.num_layers
    learned = hasattr(student, PROJ)
    if report is not None and report.is_file():
        r = json.loads(report.read_text())
        return list(r["kept_layers"]), None if learned else torch.tensor(r["kept_channels"])
    if student.cfg.hidden_size != teacher.cfg.hidden_size and not learned:
        raise SlimLMError(
            f"distill.hidden_weight with unequal hidden sizes (student {student.cfg.hidden_size}, teacher "
            f"{teacher.cfg.hidden_size}) needs the learned projection (distill.projection = 'auto' adds it in "
            "`slimlm distill`)")
    return [round((i + 1) * lt / ls) - 1 for i in range(ls)], None


@contextlib.contextmanager
def capture_layers(model: CausalLM, layers: list[int], out: dict[int, torch.Tensor]):
    """Record the residual stream after each of ``layers`` into ``out``; hooks removed on exit."""
    handles = []
    try:
        for i in layers:
            handles.append(model.model.layers[i].register_forward_hook(
                lambda _m, _in, h, i=i: out.__setitem__(i, h)))
        yield out
    finally:
        for h in handles:
            h.remove()


class DistillObjective:
    """``objective(forward, batch, step)`` for :class:`~slimlm.train.trainer.Trainer`."""

    def __init__(self, cfg: DistillConfig, teacher: CausalLM | None, student: CausalLM, student_dir: str | None = None,
                 cache=None):
        """``teacher`` may be None when ``cache`` (a :class:`~slimlm.compress.topk_cache.TopKCache`) gives
        the KL's teacher side and there is no hidden-state loss."""
        if teacher is None and (cache is None or cfg.hidden_weight):
            raise SlimLMError("distillation needs the teacher unless a top-k cache serves the KL alone")
        if teacher is not None:
            check_compatible(teacher, student)
        if cache is not None and cache.k != cfg.top_k:
            raise SlimLMError(f"distill.top_k is {cfg.top_k} but the cache {cache.path} holds k = {cache.k}")
        self.cfg, self.teacher, self.student, self.cache = cfg, teacher, student, cache
        self.pairs, self.channels = (layer_pairs(student, teacher, student_dir) if cfg.hidden_weight else ([], None))

    def uses_teacher(self, step: int) -> bool:
        return self.cfg.teacher_until_step == 0 or step < self.cfg.teacher_until_step

    def __call__(self, forward, batch: Batch, step: int) -> torch.Tensor:
        cfg = self.cfg
        mask = batch.labels != IGNORE  # (B, T)
        s_hidden: dict[int, torch.Tensor] = {}
        with capture_layers(self.student, list(range(len(self.pairs))), s_hidden):
            logits = forward(batch.input_ids, batch.position_ids, segment_ids=batch.segment_ids)  # (B, T, V)
        loss = torch.zeros((), device=logits.device)
        if cfg.lm_weight or not self.uses_teacher(step):
            lm = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum")
            if not self.uses_teacher(step):
                return lm  # SALT: the teacher is switched off
            loss = loss + cfg.lm_weight * lm
        if not (cfg.kl_weight or cfg.hidden_weight):
            return loss  # LM loss alone (e.g. the from-scratch baseline): the teacher is not run
        t_hidden: dict[int, torch.Tensor] = {}
        t_logits = None
        if self.cache is None or cfg.hidden_weight:
            with torch.no_grad(), capture_layers(self.teacher, sorted(set(self.pairs)), t_hidden):
                t_logits = self.teacher(batch.input_ids, batch.position_ids, segment_ids=batch.segment_ids)
        if cfg.kl_weight and self.cache is not None:
            values, idx = self.cache.lookup(batch)  # (B, T, k) each
            loss = loss + cfg.kl_weight * kl_topk_sum(logits[mask], values[mask], idx[mask], cfg.temperature)
        elif cfg.kl_weight:
            loss = loss + cfg.kl_weight * kl_sum(logits[mask], t_logits[mask], cfg.temperature, cfg.top_k)
        if cfg.hidden_weight:
            mse = torch.zeros((), device=logits.device)
            proj = getattr(self.student, PROJ, None)
            for i, j in enumerate(self.pairs):
                t = t_hidden[j] if self.channels is None else t_hidden[j][..., self.channels.to(t_hidden[j].device)]
                s = s_hidden[i][mask].float() if proj is None else proj[i](s_hidden[i][mask].float())
                mse = mse + (s - t[mask].float()).pow(2).mean(-1).sum()
            loss = loss + cfg.hidden_weight * mse / max(len(self.pairs), 1)
        return loss


def check_compatible(teacher: CausalLM, student: CausalLM, teacher_tok=None, student_tok=None) -> None:
    """Refuse a teacher whose vocabulary differs from the student's (no vocabulary mapping is built)."""
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise SlimLMError(f"teacher vocabulary ({teacher.cfg.vocab_size} tokens) differs from the student's "
                          f"({student.cfg.vocab_size}); distillation needs the same tokenizer")
    if teacher_tok is not None and student_tok is not None:
        from slimlm.data.prepare import tokenizer_sha256

        if tokenizer_sha256(teacher_tok) != tokenizer_sha256(student_tok):
            raise SlimLMError("teacher and student tokenizers differ (same size, other tokens); "
                              "distillation needs the same tokenizer")


def load_teacher(cfg: DistillConfig, student: CausalLM, student_tok, device: torch.device, lm=None) -> CausalLM:
    """The teacher, frozen, in fp32 on ``device`` (``lm``: an already loaded ``LoadedModel``)."""
    from slimlm.model.hub import load

    lm = lm if lm is not None else load(cfg.teacher)
    check_compatible(lm.model, student, lm.tokenizer, student_tok)
    teacher = lm.model.float().to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
