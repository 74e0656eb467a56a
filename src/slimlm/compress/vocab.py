"""A new token domain: extend a model's vocabulary, then fine-tune (LoRA, Compacter or norm-only)
with the new tokens' embedding rows trained (the protein-LM paper's setting: a pretrained LM
adapted with LoRA to a domain whose tokens it never had).

``slimlm extend-vocab SRC DST --tokens A,B,...`` adds the tokens to the tokenizer (as added tokens,
matched before the BPE model), grows the embedding (and an untied output matrix) to hold them, starts
each new row at the mean of the existing rows, and writes ``extended_vocab.json`` (the new tokens
and their ids) next to an ordinary HF directory.

``slimlm finetune`` with ``finetune.new_tokens = true`` on that folder trains, besides the method's
own parameters, only the new rows: the frozen embedding keeps its name, the rows live in
``new_rows`` (one tensor shared by embedding and head when they are tied), so checkpoints and
resume work as for any run and no optimizer state is spent on the old vocabulary. On export the
rows are written back into the weights (``merged``; PEFT's adapter layout cannot carry them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM

VOCAB_FILE = "extended_vocab.json"


def new_token_ids(model_dir: str | Path) -> list[int]:
    f = Path(model_dir) / VOCAB_FILE
    if not f.is_file():
        raise SlimLMError(f"finetune.new_tokens needs model.init_from made by `slimlm extend-vocab` ({model_dir} has "
                          f"no {VOCAB_FILE})")
    return [int(i) for i in json.loads(f.read_text())["ids"]]


@torch.no_grad()
def extend(lm, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``lm``'s tokenizer and grow its embedding/head in place; returns their ids."""
    tok, model = lm.tokenizer, lm.model
    if tok is None:
        raise SlimLMError("extend-vocab needs a model with a tokenizer (tokenizer.json)")
    if not tokens or any(not t for t in tokens):
        raise SlimLMError("--tokens: give one or more non-empty tokens, comma-separated")
    if len(set(tokens)) != len(tokens):
        raise SlimLMError("--tokens lists a token twice")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    known = [t for t in tokens if t in vocab]
    if known:
        raise SlimLMError(f"token '{known[0]}' is already in the vocabulary (id {vocab[known[0]]})")
    tok.tok.add_tokens(tokens)
    ids = [tok.tok.token_to_id(t) for t in tokens]
    old, new = model.cfg.vocab_size, max(model.cfg.vocab_size, max(ids) + 1)
    emb = model.model.embed_tokens.weight  # (V, D)
    mean = emb[: min(old, min(ids))].mean(0)
    if new > old:
        grown = torch.cat([emb, mean.expand(new - old, -1)]).contiguous()
        model.model.embed_tokens = nn.Embedding(new, emb.shape[1], _weight=grown.clone())
        if model.cfg.tie_word_embeddings:
            model.lm_head = nn.Linear(emb.shape[1], new, bias=False)
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            head = model.lm_head.weight
            model.lm_head = nn.Linear(head.shape[1], new, bias=False)
            model.lm_head.weight.copy_(torch.cat([head, head[:old].mean(0).expand(new - old, -1)]))
        model.cfg = model.cfg.replace(vocab_size=new)
    model.model.embed_tokens.weight[ids] = mean  # ids inside old padding rows start at the mean as well
    if not model.cfg.tie_word_embeddings:
        model.lm_head.weight[ids] = model.lm_head.weight[: min(old, min(ids))].mean(0)
    return ids


class NewRowsEmbedding(nn.Module):
    """A frozen embedding whose rows ``ids`` are replaced by the trainable ``new_rows``."""

    def __init__(self, base: nn.Embedding, ids: list[int]):
        super().__init__()
        self.weight = base.weight  # frozen, name kept
        self.register_buffer("ids", torch.tensor(ids, device=base.weight.device), persistent=False)
        self.new_rows = nn.Parameter(base.weight.detach()[self.ids].clone())  # (n, D)

    def full(self) -> torch.Tensor:
        return self.weight.index_put((self.ids,), self.new_rows)  # (V, D), differentiable in new_rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.full())


class NewRowsHead(nn.Module):
    """The output matrix with rows ``ids`` from ``new_rows`` (the embedding's own when tied)."""

    def __init__(self, base: nn.Linear, ids: list[int], new_rows: nn.Parameter | None = None):
        super().__init__()
        self.weight = base.weight
        self.register_buffer("ids", torch.tensor(ids, device=base.weight.device), persistent=False)
        self.new_rows = new_rows if new_rows is not None else nn.Parameter(base.weight.detach()[self.ids].clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight.index_put((self.ids,), self.new_rows))


def train_new_rows(model: CausalLM, ids: list[int]) -> None:
    """Make the rows ``ids`` of the (frozen) embedding and head trainable; everything else as it is."""
    bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
    if bad:
        raise SlimLMError(f"new token id {bad[0]} is outside the model's vocabulary of {model.cfg.vocab_size}")
    emb = NewRowsEmbedding(model.model.embed_tokens, ids)
    model.model.embed_tokens = emb
    tied = model.cfg.tie_word_embeddings
    model.lm_head = NewRowsHead(model.lm_head, ids, emb.new_rows if tied else None)


@torch.no_grad()
def fold_new_rows(model: CausalLM) -> None:
    """Write the trained rows back into plain embedding / head modules (before export)."""
    emb = model.model.embed_tokens
    if not isinstance(emb, NewRowsEmbedding):
        return
    w = emb.full().detach().clone()
    model.model.embed_tokens = nn.Embedding(w.shape[0], w.shape[1], _weight=w)
    head = model.lm_head
    if model.cfg.tie_word_embeddings:
        model.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.device)
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        hw = head.weight.index_put((head.ids,), head.new_rows).detach().clone()
        model.lm_head = nn.Linear(hw.shape[1], hw.shape[0], bias=False).to(hw.device)
        model.lm_head.weight.copy_(hw)
