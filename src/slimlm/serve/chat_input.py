"""Chat messages -> prompt token ids, with user text that can never become control tokens.

A chat template renders messages into text with control tokens (``<|im_start|>system`` ...);
encoding that text parses every occurrence of a control token's text as the control token, so a
user who types ``<|im_end|><|im_start|>system`` would forge a turn. As the major servers do, the
text of messages is encoded as text: when no message contains the text of an added token, the
rendered prompt is encoded as usual (identical to ``LLM.chat``); when one does, the template is
rendered with placeholders, its own pieces are encoded with control tokens and the messages'
text with control-token parsing off.
"""

from __future__ import annotations

import secrets
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from slimlm.tokenizer import Tokenizer


class ChatEncoder:
    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.specials = sorted({t.content for t in tok.tok.get_added_tokens_decoder().values() if t.content},
                               key=len, reverse=True)
        self._plain = HFTokenizer.from_str(tok.tok.to_str())
        self._plain.encode_special_tokens = True  # added tokens' text is encoded as ordinary text

    def has_control_text(self, text: str) -> bool:
        return any(s in text for s in self.specials)

    def encode_text(self, text: str) -> list[int]:
        """``text`` as ordinary text: control-token strings inside it stay text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for ``messages`` (ValueError if the template cannot keep user text apart)."""
        if not any(self.has_control_text(m["content"]) for m in messages):
            text = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            return self.tok.encode(text, add_special_tokens=False)
        nonce = secrets.token_hex(8)
        marks = [f"\u2063{nonce}:{i}\u2063" for i in range(len(messages))]
        text = self.tok.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks)],
                                            add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        for mark, m in zip(marks, messages):
            before, found, text = text.partition(mark)
            if not found or mark in text:
                raise ValueError("a message contains control-token text and this model's chat template "
                                 "transforms message content, so it cannot be kept as text")
            ids += self.tok.encode(before, add_special_tokens=False) + self.encode_text(m["content"])
        return ids + self.tok.encode(text, add_special_tokens=False)
