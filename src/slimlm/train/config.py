"""The training config: typed sections, read from TOML/JSON plus ``--section.key value`` overrides.

Every key is checked: an unknown one is an error that lists the valid keys of its section. The
``[schedule]`` section picks its dataclass by ``name`` from the schedule registry.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimLMError
from slimlm.train.schedules import SCHEDULES, WSD, Schedule


@dataclass
class GrowthConfig:
    source: str | None = None
    """Trained smaller model to grow from (a model directory, checkpoint or run folder); None: no growth."""
    operator: str = "stack"
    """Growth operator from ``slimlm.train.growth.GROWTH_OPERATORS``: 'stack' is G_stack (Du et al.,
    2024: the whole layer stack repeated), 'interleave' repeats each layer in place."""
    factor: float = 2.0
    """Depth growth factor g: the grown model has g x the source's layers (the paper's g = 4; any
    factor that gives a whole number of layers)."""

    def __post_init__(self) -> None:
        from slimlm.train.growth import GROWTH_OPERATORS

        if self.operator not in GROWTH_OPERATORS:
            raise SlimLMError(f"model.growth.operator '{self.operator}' is unknown; known: {', '.join(GROWTH_OPERATORS.names())}")
        if self.factor < 1:
            raise SlimLMError(f"model.growth.factor must be >= 1; got {self.factor:g}")


@dataclass
class MoESpec:
    num_experts: int = 0
    """Routed experts per MoE MLP (0: dense model). MiniCPM-MoE: 8."""
    top_k: int = 2
    """Experts per token (MiniCPM-MoE, Mixtral: 2)."""
    shared_experts: int = 0
    """Experts every token also goes through (DeepSeekMoE's shared experts)."""
    intermediate_size: int = 0
    """Width of each expert's MLP (0: the preset's intermediate_size)."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer and Mixtral use 0.01; 0 turns it off)."""
    balance: str = "global"
    """Expert frequencies f_i of the balancing loss over the 'global' batch (all micro-batches and
    ranks; Qiu et al., 2025, "Demons in the Detail") or per 'micro_batch' (the usual implementation)."""

    def __post_init__(self) -> None:
        if self.num_experts < 0 or self.shared_experts < 0 or self.intermediate_size < 0 or self.aux_loss_weight < 0:
            raise SlimLMError("model.moe.num_experts, shared_experts, intermediate_size and aux_loss_weight must be >= 0")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise SlimLMError(f"model.moe.top_k {self.top_k} must be between 1 and model.moe.num_experts {self.num_experts}")
        if self.balance not in ("global", "micro_batch"):
            raise SlimLMError(f"model.moe.balance must be global or micro_batch; got '{self.balance}'")


@dataclass
class MuPSpec:
    """μP settings (``model.parameterization = "mup"``; formulas in ``slimlm.model.mup``)."""

    base_width: int = 256
    """d0: hidden width of the base (proxy) model the hyper-parameters were tuned at (MiniCPM: 256).
    The width multiplier m = hidden_size / base_width divides the hidden matrices' Adam lr, their
    init variance and the logits."""
    input_multiplier: float = 1.0
    """Factor on the embedding output (MiniCPM's scale_emb = 12)."""
    output_multiplier: float = 1.0
    """Factor on the logits at the base width."""
    base_head_dim: int = 0
    """Head width of the base model, for μP's 1/d attention scale sqrt(base_head_dim) / head_dim
    (0: the model's own head_dim, i.e. heads are added as the model widens)."""

    def __post_init__(self) -> None:
        if self.base_width < 1:
            raise SlimLMError(f"model.mup.base_width must be >= 1; got {self.base_width}")
        for k in ("input_multiplier", "output_multiplier"):
            v = getattr(self, k)
            if not (v > 0 and v != float("inf")):
                raise SlimLMError(f"model.mup.{k} must be a positive number; got {v}")
        if self.base_head_dim < 0:
            raise SlimLMError(f"model.mup.base_head_dim must be >= 0; got {self.base_head_dim}")


@dataclass
class ModelSpec:
    preset: str = "micro"
    """Shape from ``slimlm.train.presets.PRESETS`` for training from scratch."""
    init_from: str | None = None
    """Known model name or HF directory to continue pre-training from (its shape wins over preset)."""
    vocab_size: int | None = None
    """Vocabulary of a new model; default: the data's tokenizer, rounded up to a multiple of 64."""
    num_layers: int | None = None
    """Override the preset's depth (e.g. a shallower model to grow with model.growth)."""
    hidden_size: int | None = None
    """Override the preset's width (a μP width sweep); set num_heads with it to keep head_dim."""
    intermediate_size: int | None = None
    """Override the preset's MLP width."""
    num_heads: int | None = None
    """Override the preset's attention heads (head_dim = hidden_size / num_heads)."""
    num_kv_heads: int | None = None
    """Override the preset's key/value heads (must divide num_heads)."""
    parameterization: str = "standard"
    """'standard' or 'mup' (μP, Yang et al., 2022; MiniCPM's wind tunnel): width-independent init,
    per-layer lr multipliers and a logit multiplier, so an lr tuned at model.mup.base_width transfers."""
    mup: MuPSpec = field(default_factory=MuPSpec)
    """μP's base width and multipliers (used with parameterization = 'mup')."""
    init_std: float = 0.02
    """Std of the normal init of a new model's matrices (GPT-2, Radford et al., 2019)."""
    norm_placement: str = "pre"
    """'pre', 'post' or 'mix' (Mix-LN, Li et al., 2024: Post-LN in the first layers, Pre-LN after)."""
    post_ln_fraction: float = 0.25
    """Mix-LN's alpha: share of the layers, from the first, that use Post-LN (the paper's 0.25)."""
    moe: MoESpec = field(default_factory=MoESpec)
    """Mixture-of-experts MLPs for a new model (MiniCPM-MoE shape) and their balancing loss."""
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    """Start from a smaller trained model grown deeper (G_stack) instead of a random init."""
    rope_theta: float | None = None
    """ABF (Xiong et al. 2023): the RoPE base for continued pre-training on long sequences (e.g.
    the model's 100,000 -> 1,000,000); None keeps the model's. See train/long_context.py."""
    context_length: int | None = None
    """The context the model states from now on (max_position_embeddings), so data.seq_len may
    exceed the old one; None keeps the model's."""

    def __post_init__(self) -> None:
        if self.norm_placement not in ("pre", "post", "mix"):
            raise SlimLMError(f"model.norm_placement must be pre, post or mix; got '{self.norm_placement}'")
        if not 0.0 <= self.post_ln_fraction <= 1.0:
            raise SlimLMError(f"model.post_ln_fraction must be in [0, 1]; got {self.post_ln_fraction}")
        if self.num_layers is not None and self.num_layers < 1:
            raise SlimLMError(f"model.num_layers must be >= 1; got {self.num_layers}")
        for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise SlimLMError(f"model.{k} must be >= 1; got {v}")
        if self.parameterization not in ("standard", "mup"):
            raise SlimLMError(f"model.parameterization must be standard or mup; got '{self.parameterization}'")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Prepared token folders (``slimlm data prepare``); several make a mixture."""
    weights: list[float] = field(default_factory=list)
    """Mixture weight per train folder (replay of an old corpus: Ibrahim et al., 2024 use 1-25%)."""
    val: list[str] = field(default_factory=list)
    """Folders whose 'val' split is evaluated, each reported on its own; default: the train folders."""
    seq_len: int = 512
    """Tokens per sequence (the longest sequence for 'varlen')."""
    packing: str = "document"
    """'document' (packed, document masks), 'concat' (classic concat-and-chunk) or 'varlen'
    (one document per sequence, bucketed by length: Dataset Decomposition, Pouransari et al., 2024)."""
    micro_batch: int = 8
    """Sequences per rank per forward (for 'varlen': micro_batch * seq_len tokens per forward)."""
    min_len: int = 32
    """'varlen': shortest chunk kept."""
    curriculum: str = "uniform"
    """'varlen': order of the length buckets (``slimlm.data.curriculum.CURRICULA``): 'uniform', or
    'grow' (Dataset Decomposition's short-to-long curriculum, Pouransari et al., 2024, Sec. 3.2)."""
    curriculum_cycles: int = 1
    """'grow': short-to-long rounds per epoch (the paper's cyclic curriculum)."""
    seed: int = 0
    """Seeds the document order of every epoch."""

    def __post_init__(self) -> None:
        if self.packing not in ("document", "concat", "varlen"):
            raise SlimLMError(f"data.packing must be document, concat or varlen; got '{self.packing}'")
        from slimlm.data.curriculum import CURRICULA

        CURRICULA.get(self.curriculum)  # unknown names list the known ones
        if self.curriculum_cycles < 1:
            raise SlimLMError(f"data.curriculum_cycles must be >= 1; got {self.curriculum_cycles}")
        if self.curriculum != "uniform" and self.packing != "varlen":
            raise SlimLMError(f"data.curriculum '{self.curriculum}' orders length buckets: it needs data.packing = 'varlen'")
        if self.seq_len < 2 or self.micro_batch < 1:
            raise SlimLMError("data.seq_len must be >= 2 and data.micro_batch >= 1")


@dataclass
class LowRankConfig:
    """Gradient low-rank projection for ``optim.name = "galore"`` and ``"gradnorm_lorp"``."""

    rank: int = 128
    """r: rank of the subspace each layer matrix's Adam state lives in (GaLore, Zhao et al., 2024,
    Sec. 5: 128 for 60M, 256 for 130M-350M, 512 for 1B); at most the matrix's smaller dimension."""
    update_proj_gap: int = 200
    """T: updates between refreshes of the projector (an SVD of the current gradient); GaLore uses 200."""
    scale: float = 0.25
    """alpha: the projected-back update is multiplied by this (GaLore uses 0.25)."""
    proj_type: str = "std"
    """'std': project on the smaller side of each matrix (GaLore's default); 'left' or 'right'."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.update_proj_gap < 1 or self.scale <= 0:
            raise SlimLMError(f"optim.galore needs rank >= 1, update_proj_gap >= 1 and scale > 0; got rank {self.rank}, "
                              f"update_proj_gap {self.update_proj_gap}, scale {self.scale}")
        if self.proj_type not in ("std", "left", "right"):
            raise SlimLMError(f"optim.galore.proj_type must be std, left or right; got '{self.proj_type}'")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer from ``slimlm.train.optimizers.OPTIMIZERS`` (adamw, lamb, galore, gradnorm_lorp)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam moments' decay (0.95 for beta2 as in GPT-3 and Llama)."""
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (Loshchilov & Hutter, 2019)."""
    clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    galore: LowRankConfig = field(default_factory=LowRankConfig)
    """Low-rank projection settings (used by the galore and gradnorm_lorp optimizers only)."""


@dataclass
class LoopConfig:
    steps: int = 1000
    """Optimizer updates (the schedule's N); replaced by a time budget when one is set."""
    grad_accum: int = 1
    """Micro-batches per update."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast; master weights and optimizer state stay fp32)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    seed: int = 0
    """Seeds the initialisation of a new model."""
    threads: int | None = None
    """torch CPU threads (default: all cores)."""
    time_budget_minutes: float | None = None
    """Languini protocol (Stanić et al., 2023): train for this much time; the update count is set
    from the throughput measured over the first ``budget_probe_steps`` updates."""
    budget_probe_steps: int = 5
    """Updates over which throughput is measured for the time budget (the first is not timed)."""
    attention: str = "dense"
    """Document-masked attention: 'dense' (a T x T mask into SDPA), 'varlen' (each document its
    own causal SDPA call, no mask; any device) or 'flex' (flex_attention block masks; training
    needs CUDA). The same numbers either way; see ``slimlm.train.doc_attention``."""
    compile: bool = False
    """torch.compile the model: inductor fuses the norm / RoPE / SwiGLU element-wise work (about
    7% faster per update for tiny-15m on CPU); the first update pays the compilation (~50 s on
    2 CPU cores), and each new sequence length of 'varlen' may compile again."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise SlimLMError(f"train.precision must be fp32 or bf16; got '{self.precision}'")
        if self.attention not in ("dense", "varlen", "flex"):
            raise SlimLMError(f"train.attention must be dense, varlen or flex; got '{self.attention}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SlimLMError(f"train.device must be auto, cpu or cuda; got '{self.device}'")
        if self.steps < 1 or self.grad_accum < 1 or self.budget_probe_steps < 2:
            raise SlimLMError("train.steps and train.grad_accum must be >= 1, train.budget_probe_steps >= 2")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many updates (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept (older good ones are deleted once a newer one is written and verified)."""
    resume: bool = True
    """Continue from the newest good checkpoint in out_dir if there is one."""
    resume_from: str | None = None
    """Continue from this checkpoint folder (its weights, optimizer, data position and update
    count) into out_dir: e.g. branch a WSD decay from a stable-phase checkpoint of another run."""
    sharded: bool = False
    """With several processes: every rank writes its own shards of the model and optimizer state
    through torch.distributed.checkpoint (no gather to rank 0); ``slimlm runs consolidate`` makes
    one a Hugging Face directory. See ``slimlm.train.sharded_checkpoint``."""
    allow_config_change: bool = False
    """Resume even though technique settings (``TECHNIQUE_KEYS``) differ from the checkpoint's
    (``slimlm train ... --allow-config-change``); otherwise such a resume is refused."""


@dataclass
class LogConfig:
    every: int = 10
    """Write train metrics every this many updates."""
    eval_every: int = 0
    """Evaluate held-out loss every this many updates (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per held-out evaluation (per val folder)."""
    eval_at_start: bool = False
    """Also evaluate before the first update (continual pre-training: the 'before' numbers)."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class DistConfig:
    strategy: str = "ddp"
    """'ddp' (replicated, gradients all-reduced) or 'fsdp2' (sharded, torch.distributed.fsdp.fully_shard)."""
    backend: str = "auto"
    """'auto' (nccl on GPU, gloo on CPU), 'gloo' or 'nccl'."""

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp2") or self.backend not in ("auto", "gloo", "nccl"):
            raise SlimLMError("dist.strategy must be ddp or fsdp2; dist.backend auto, gloo or nccl")


@dataclass
class ObjectiveConfig:
    """Training objective: a mixture of token-prediction targets (TokenUnify, Chen et al., 2024);
    the default is plain next-token prediction. See ``slimlm.train.token_mixture``."""

    next_token: float = 1.0
    """Weight of next-token prediction."""
    next_all: float = 0.0
    """Weight of next-all-token prediction: the mean loss of predicting each of the next ``horizon`` tokens."""
    random_position: float = 0.0
    """Weight of predicting the token at one random offset k in [2, horizon] (drawn per update)."""
    horizon: int = 4
    """K: how far ahead next_all and random_position look."""

    def __post_init__(self) -> None:
        ws = (self.next_token, self.next_all, self.random_position)
        if min(ws) < 0 or sum(ws) <= 0:
            raise SlimLMError(f"objective weights (next_token {self.next_token}, next_all {self.next_all}, "
                              f"random_position {self.random_position}) must be >= 0 and sum to a positive value")
        if self.horizon < 1:
            raise SlimLMError(f"objective.horizon must be >= 1; got {self.horizon}")

    @property
    def plain(self) -> bool:
        return self.next_all == 0 and self.random_position == 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/run"
    """Checkpoints, metrics.jsonl and TensorBoard logs go here."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: Schedule = field(default_factory=WSD)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["schedule"] = {"name": schedule_name(self.schedule), **d["schedule"]}
        return d


#: Config keys (prefixes of flattened keys) that define *what* is trained: resuming with any of them
#: changed mixes two recipes in one run, so it is refused unless checkpoint.allow_config_change.
TECHNIQUE_KEYS = ("model.", "optim.name", "optim.galore.", "data.packing", "data.curriculum", "objective.")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def technique_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: saved -> now' for each technique key that differs between two ``to_dict()`` configs."""
    a, b = flatten(saved), flatten(now)
    keys = sorted(k for k in set(a) | set(b) if k.startswith(TECHNIQUE_KEYS) and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def schedule_name(s: Schedule) -> str:
    return next(n for n in SCHEDULES.names() if SCHEDULES.get(n) is type(s))


# ---------------------------------------------------------------------------- reading
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    raw: dict[str, Any] = read_file(Path(path)) if path is not None else {}
    apply_overrides(raw, parse_overrides(overrides or []))
    return build(TrainConfig, raw, "")


def apply_overrides(raw: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted ``section.key`` of ``pairs`` in the raw (file) config, in place."""
    for key, value in pairs:
        *sections, last = key.split(".")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise SlimLMError(f"--{key}: '{s}' is not a section")
        node[last] = value
    return raw


def read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SlimLMError(f"config file {path} not found")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise SlimLMError(f"cannot parse {path}: {e}") from None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--train.steps', '10', '--data.seq_len=64'] -> [('train.steps', '10'), ('data.seq_len', '64')]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise SlimLMError(f"expected --section.key value, got '{a}'")
        key, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise SlimLMError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if cls is Schedule:
        raw = dict(raw)
        cls = SCHEDULES.get(str(raw.pop("name", "wsd")))
    if not isinstance(raw, dict):
        raise SlimLMError(f"'{where}' must be a section, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        prefix = f"{where}." if where else ""
        raise SlimLMError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys{' in [' + where + ']' if where else ''}: "
            f"{', '.join(sorted(fields) + (['name'] if issubclass(cls, Schedule) else []))}"
        )
    kwargs = {}
    for k, v in raw.items():
        kind = hints[k]
        key = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(kind) or kind is Schedule:
            kwargs[k] = build(kind, v, key)
        else:
            kwargs[k] = coerce(v, kind, key)
    return cls(**kwargs)


def coerce(v: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        return coerce(v, next(a for a in args if a is not type(None)), key)
    if origin is list:
        items = v if isinstance(v, list) else ([] if v == "" else str(v).split(","))
        return [coerce(x.strip() if isinstance(x, str) else x, args[0], key) for x in items]
    try:
        if kind is bool:
            if isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return v.lower() in ("true", "1", "yes")
            return bool(v)
        if kind is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            return int(float(v)) if isinstance(v, str) and "e" in v.lower() else int(v)
        if kind is float:
            return float(v)
        if kind is str:
            return str(v)
    except (TypeError, ValueError):
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))
        raise SlimLMError(f"config key '{key}' needs {what}, got {v!r}") from None
    return v
