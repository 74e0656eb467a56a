"""`slimlm tokenizer train`: a byte-level BPE tokenizer (GPT-2 style) trained with `tokenizers`.

Trained on the train split only (held-out documents are excluded by the same hash as
`data prepare`), saved as tokenizer.json + tokenizer_config.json that slimlm and transformers load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from slimlm.data.sources import is_heldout, resolve
from slimlm.errors import SlimLMError
from slimlm.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(
    sources: list[str],
    out: str | Path,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    max_chars: int | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise SlimLMError(f"vocab size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    resolved = [resolve(s) for s in sources]

    def texts() -> Iterator[str]:
        seen = 0
        for s in resolved:
            for d in s.documents():
                if is_heldout(d.name, val_fraction):
                    continue
                yield d.text
                seen += len(d.text)
                if max_chars is not None and seen >= max_chars:
                    return

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    hf.train_from_iterator(texts(), trainer)
    if hf.get_vocab_size() <= 256 + len(SPECIAL_TOKENS):
        raise SlimLMError(f"no text to train a tokenizer on in {', '.join(sources)}")
    tok = Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    return tok
