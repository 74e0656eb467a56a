"""Fine-tuning methods: LoRA merge = adapter output, PEFT loads our adapter, norm-only touches only
norms, Compacter's parameter count, every method resumes step-exactly, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from slimlm.cli import main
from slimlm.compress.adapters import METHODS, FinetuneConfig, trainable
from slimlm.compress.adapters.compacter import PHMLinear, SharedKron, compacter_params
from slimlm.compress.adapters.lora import LoRALinear
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from slimlm.train.metrics import read_metrics
from slimlm.train.trainer import Trainer
from tests.conftest import make_hf_model
from tests.train.helpers import tiny_args

from tests.train.conftest import one_thread, prepared, tokenizer_dir  # noqa: F401,E402  (shared fixtures)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("ft-base")
    make_hf_model(path, "llama")
    return path


def ids():
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def perturbed_lora(base_dir, **kw):
    model = load(base_dir).model
    method = METHODS.get("lora")(FinetuneConfig(method="lora", rank=4, **kw))
    method.apply(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model, method


def test_lora_merged_output_equals_adapter_output(base_dir):
    model, method = perturbed_lora(base_dir, targets=["q_proj", "v_proj", "down_proj"])
    base = load(base_dir).model
    with torch.no_grad():
        adapted = model(ids())
        assert not torch.allclose(adapted, base(ids()), atol=1e-3)  # the adapter changes the output
        method.merge(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(ids()), adapted, rtol=1e-5, atol=1e-5)


def test_peft_loads_our_adapter_and_agrees(base_dir, tmp_path):
    peft = pytest.importorskip("peft", reason="the 'peft' extra is not installed")
    import transformers

    model, method = perturbed_lora(base_dir, targets=["q_proj", "o_proj"], alpha=8.0)
    method.save_peft(model, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids()).logits, model(ids()), rtol=1e-4, atol=1e-4)


def test_compacter_parameter_count_matches_its_formula(base_dir):
    model = load(base_dir).model
    cfg = FinetuneConfig(method="compacter", n=4, bottleneck=8, rank=1)
    METHODS.get("compacter")(cfg).apply(model)
    L, d = model.cfg.num_layers, model.cfg.hidden_size
    assert trainable(model) == compacter_params(4, d, 8, 1, adapters=2 * L) == 4**3 + 2 * L * (2 * (d + 8) + d + 8)
    with torch.no_grad():  # identity at the start: the up projection is zero
        torch.testing.assert_close(model(ids()), load(base_dir).model(ids()))


def test_phm_weight_is_a_sum_of_kronecker_products():
    shared = SharedKron(2)
    layer = PHMLinear(shared, 2, 6, 4, rank=2)
    expect = sum(torch.kron(shared.A[i], layer.s[i] @ layer.t[i]) for i in range(2))
    torch.testing.assert_close(layer.weight(), expect)


def ft_args(prepared, base, out, method, *extra):
    config = out.parent / f"{out.name}.toml"
    config.write_text(f'[model]\ninit_from = "{base}"\n[finetune]\nmethod = "{method}"\nrank = 2\nn = 2\n'
                      'bottleneck = 4\nsave = "both"\ntargets = ["q_proj", "v_proj"]\n')
    return ["finetune", str(config), *tiny_args(prepared, out, "--optim.weight_decay", "0.0", *extra)]


def test_norm_only_updates_nothing_but_norms(prepared, base_dir, tmp_path, capsys):
    assert main([*ft_args(prepared, base_dir, tmp_path / "run", "lora"), "--method", "norm"]) == 0  # --method wins
    err = capsys.readouterr().err
    assert "trainable of" in err and "optimizer state measured" in err
    before = load_file(base_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "merged" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("norm" in k for k in changed)


@pytest.mark.parametrize("method", ["lora", "compacter", "norm"])
def test_every_method_resumes_step_exactly(prepared, base_dir, tmp_path, method, capsys):
    from slimlm.compress.run_config import load_run

    assert main(ft_args(prepared, base_dir, tmp_path / "ref", method)) == 0
    args = ft_args(prepared, base_dir, tmp_path / "run", method)
    cfg, fcfg = load_run(args[1], args[2:], "finetune", FinetuneConfig)
    t = Trainer(cfg, adapt=METHODS.get(method)(fcfg).apply)
    t.fit(max_updates=4)  # checkpoint at 3, killed after 4
    t.close()
    assert main(args) == 0
    assert "resumed from" in capsys.readouterr().err

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}

    ref = losses(tmp_path / "ref")
    assert losses(tmp_path / "run") == ref and ref[6] < ref[1]
    if method == "lora":
        assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
        merged = load_file(tmp_path / "run" / "merged" / "model.safetensors")
        assert not any("lora" in k for k in merged)


@pytest.mark.parametrize("kw, msg", [
    (dict(targets=["qproj"]), "finetune.targets 'qproj' matches no module; valid: q_proj"),
    (dict(method="dora"), "unknown fine-tuning method 'dora'; known: compacter, lora, norm"),
    (dict(method="compacter", n=3, bottleneck=8), "bottleneck 8 must be a multiple of finetune.n 3"),
])
def test_bad_finetune_config(kw, msg):
    with pytest.raises(SlimLMError, match=msg):
        FinetuneConfig(**kw)


def test_rank_larger_than_the_matrix_is_refused(base_dir):
    with pytest.raises(SlimLMError, match="finetune.rank 100 is larger than q_proj's 64x64 matrix"):
        METHODS.get("lora")(FinetuneConfig(rank=100)).apply(load(base_dir).model)


def test_engine_serves_the_compacter_folder_with_equal_logits(prepared, base_dir, tmp_path):
    """`finetune --method compacter` writes out/compacter; hub.load (the engine's loader) attaches the
    adapters again: its logits equal the trained adapter model's, and greedy generation through
    the engine is the adapter model's greedy continuation."""
    from slimlm.compress.adapters.compacter import CompacterLinear
    from slimlm.engine.llm import LLM

    model = load(base_dir).model
    method = METHODS.get("compacter")(FinetuneConfig(method="compacter", n=2, bottleneck=4, rank=1))
    method.apply(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CompacterLinear):
                m.up.t.copy_(torch.randn(m.up.t.shape, generator=g) * 0.5)  # a trained, non-identity adapter
    out = tmp_path / "run"
    method.export(model, out, load(base_dir).tokenizer)
    served = load(out / "compacter").model
    assert any(isinstance(m, CompacterLinear) for m in served.modules())
    with torch.no_grad():
        ref = model(ids())
        assert not torch.allclose(ref, load(base_dir).model(ids()), atol=1e-3)
        torch.testing.assert_close(served(ids()), ref)
    prompt = ids()[0].tolist()
    from slimlm.engine.params import SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    got = LLM(str(out / "compacter")).generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert list(got) == seq[len(prompt):]
