"""ChatSession: a multi-turn conversation on :class:`LLM` (history, chat template, streaming),
and the REPL of ``slimlm chat`` on top of it.

Every turn renders the whole history with the model's chat template; the prefix cache keeps
the earlier turns' KV blocks, so only the new message is computed. When the history no longer
fits the context with room for the reply, the oldest turns are dropped (the system message
stays) and the user is told.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TextIO

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimLMError

COMMANDS = {
    "/reset": "forget the conversation (keeps the system message)",
    "/system TEXT": "set the system message (and reset); /system alone clears it",
    "/stats": "token counts and speed of the last reply",
    "/stats on|off": "print them after every reply",
    "/help": "this list",
    "/exit": "leave (also /quit, Ctrl-D)",
}


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str | None = None

    def line(self) -> str:
        decode = max(self.output_tokens - 1, 0) / max(self.total_s - self.first_token_s, 1e-9)
        return (f"[prompt {self.prompt_tokens:,} tokens, reply {self.output_tokens:,} tokens in {self.total_s:.2f} s; "
                f"first token {self.first_token_s * 1000:.0f} ms, decode {decode:.1f} tok/s; "
                f"finish: {self.finish_reason}]")


@dataclass
class ChatSession:
    llm: LLM
    params: SamplingParams
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    last: TurnStats = field(default_factory=TurnStats)
    notice: Callable[[str], None] = lambda msg: None

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self, system: str | None = ...) -> None:  # type: ignore[assignment]
        self.history.clear()
        if system is not ...:
            self.system = system or None

    def _fit(self) -> list[int]:
        """Token ids of the conversation; drops the oldest turns until the reply has room."""
        ctx = self.llm.context_length
        limit = ctx - min(self.params.max_tokens, ctx // 4)
        while True:
            _, ids = self.llm._chat_ids(self.messages())
            if len(ids) <= limit or len(self.history) <= 1:
                return ids
            del self.history[:2]  # the oldest user message and its reply
            self.notice("(the oldest turn was dropped to fit the model's context)")

    def send(self, text: str) -> Iterator[str]:
        """Add a user message; yield the reply's text as it is generated; keep it in the history.
        A request refused before any token (too long, bad template) leaves the history as it was;
        an interrupted reply is kept as far as it got."""
        self.history.append({"role": "user", "content": text})
        st, reply, started = TurnStats(), [], False
        t0 = time.perf_counter()
        try:
            ids = self._fit()
            st.prompt_tokens = len(ids)
            room = self.llm.context_length - len(ids)  # the reply is capped to what is left
            params = replace(self.params, max_tokens=max(1, min(self.params.max_tokens, room)))
            for out in self.llm.stream(ids, params):
                started = True
                c = out.outputs[0]
                if c.token_ids and not st.output_tokens:
                    st.first_token_s = time.perf_counter() - t0
                st.output_tokens += len(c.token_ids)
                st.finish_reason = c.finish_reason
                reply.append(c.text)
                if c.text:
                    yield c.text
        except BaseException:
            if not started:
                self.history.pop()
                raise
            st.finish_reason = "abort"
            raise
        finally:
            st.total_s = time.perf_counter() - t0
            self.last = st
            if started:
                self.history.append({"role": "assistant", "content": "".join(reply)})


def repl(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         show_stats: bool = False) -> int:
    """Read lines from ``inp``; slash commands or messages. Returns the exit code."""
    interactive = inp.isatty()

    def say(msg: str) -> None:
        print(msg, file=err, flush=True)

    session.notice = say
    say("slimlm chat: type a message; /help lists the commands, /exit leaves.")
    while True:
        if interactive:
            out.write(">>> ")
            out.flush()
        line = inp.readline()
        if not line:  # EOF / Ctrl-D
            if interactive:
                out.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/reset":
                session.reset()
                say("(conversation cleared)")
            elif cmd == "/system":
                session.reset(arg.strip())
                say(f"(system message {'set' if arg.strip() else 'cleared'}; conversation cleared)")
            elif cmd == "/stats":
                if arg.strip() in ("on", "off"):
                    show_stats = arg.strip() == "on"
                    say(f"(stats {arg.strip()})")
                else:
                    say(session.last.line())
            elif cmd in ("/help", "/?"):
                say("\n".join(f"  {k:<15} {v}" for k, v in COMMANDS.items()))
            else:
                say(f"unknown command {cmd!r}; commands: {', '.join(dict.fromkeys(k.split()[0] for k in COMMANDS))}")
            continue
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            say("\n(interrupted)")
        except (ValueError, SlimLMError) as e:  # refused before the reply started; the history is unchanged
            say(f"error: {e}")
            continue
        out.write("\n")
        out.flush()
        if show_stats:
            say(session.last.line())
