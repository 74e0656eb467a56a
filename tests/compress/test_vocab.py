"""A new token domain: extend the vocabulary, LoRA-fine-tune with the new rows trained, save, load."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from slimlm.cli import main
from slimlm.compress.adapters import FinetuneConfig
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from slimlm.train.metrics import read_metrics
from tests.conftest import make_hf_model
from tests.train.helpers import tiny_args

from tests.train.conftest import one_thread, tokenizer_dir  # noqa: F401,E402  (shared fixtures)

AMINO = [f"<aa_{c}>" for c in "ACDEFGHIKL"]  # 10 new tokens: ids 376..385, past the model's 384 rows


def protein_corpus(path, n=30):
    rng = random.Random(0)
    path.mkdir(parents=True)
    for i in range(n):  # a "domain": runs of the new tokens with a repeating motif, between plain words
        motif = "".join(rng.choice(AMINO) for _ in range(4))
        (path / f"p{i:02d}.txt").write_text("protein " + motif * rng.randint(5, 20) + " end\n")
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_on_a_new_token_domain(tmp_path, tokenizer_dir, tied, capsys):
    from slimlm.data.prepare import prepare

    base = tmp_path / "base"
    make_hf_model(base, "llama", tie_word_embeddings=tied)
    ext = tmp_path / "ext"
    assert main(["extend-vocab", str(base), str(ext), "--tokens", ",".join(AMINO)]) == 0
    assert "10 new tokens (ids 376..385), vocabulary 384 -> 386 rows" in capsys.readouterr().err
    lm = load(ext)
    assert lm.tokenizer.encode("<aa_A><aa_C>", add_special_tokens=False) == [376, 377]
    data = tmp_path / "tokens"
    prepare([str(protein_corpus(tmp_path / "text"))], ext, data, val_fraction=0.2, progress=False)
    config = tmp_path / "ft.toml"
    config.write_text(f'[model]\ninit_from = "{ext}"\n[finetune]\nmethod = "lora"\nrank = 2\nnew_tokens = true\n')
    args = ["finetune", str(config), *tiny_args(data, tmp_path / "ref", "--optim.weight_decay", "0.0")]
    assert main(args) == 0
    assert "trainable of" in capsys.readouterr().err
    # the rows of the new tokens trained; every other row as it was
    before, after = load_file(ext / "model.safetensors"), load_file(tmp_path / "ref" / "merged" / "model.safetensors")
    emb0, emb1 = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]
    assert emb1.shape == (386, 64)
    assert torch.equal(emb0[:376], emb1[:376]) and not torch.allclose(emb0[376:], emb1[376:])
    if not tied:
        h0, h1 = before["lm_head.weight"], after["lm_head.weight"]
        assert torch.equal(h0[:376], h1[:376]) and not torch.allclose(h0[376:], h1[376:])
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r}
    assert losses[6] < losses[1]
    # the merged folder loads in slimlm and transformers with the same logits, new tokens included
    import transformers

    merged = load(tmp_path / "ref" / "merged")
    ids = torch.tensor([merged.tokenizer.encode("protein <aa_A><aa_C><aa_D>", add_special_tokens=False)])
    assert ids.max() >= 376
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "merged", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, merged.model(ids), rtol=1e-4, atol=1e-4)
    # killed after update 4 (checkpoint at 3), resumed: the same losses
    from slimlm.compress.adapters import METHODS
    from slimlm.compress.run_config import load_run
    from slimlm.compress.vocab import new_token_ids, train_new_rows
    from slimlm.train.trainer import Trainer

    cut = ["finetune", str(config), *tiny_args(data, tmp_path / "cut", "--optim.weight_decay", "0.0")]
    cfg, fcfg = load_run(cut[1], cut[2:], "finetune", FinetuneConfig)
    method = METHODS.get("lora")(fcfg)
    t = Trainer(cfg, adapt=lambda m: (method.apply(m), train_new_rows(m, new_token_ids(ext))))
    t.fit(max_updates=4)
    t.close()
    assert main(cut) == 0
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "loss" in r}
    assert got == losses


def test_bad_new_token_input(tmp_path, tokenizer_dir, capsys):
    base = tmp_path / "base"
    make_hf_model(base, "llama")
    assert main(["extend-vocab", str(base), str(tmp_path / "o"), "--tokens", "<|im_end|>"]) == 2
    assert "token '<|im_end|>' is already in the vocabulary" in capsys.readouterr().err
    with pytest.raises(SlimLMError, match="PEFT's adapter layout cannot hold"):
        FinetuneConfig(new_tokens=True, save="adapter")
    config = tmp_path / "ft.toml"
    config.write_text(f'[model]\ninit_from = "{base}"\n[finetune]\nnew_tokens = true\n')
    assert main(["finetune", str(config), "--out_dir", str(tmp_path / "r"), "--data.train", str(tmp_path)]) == 2
    assert "made by `slimlm extend-vocab`" in capsys.readouterr().err
