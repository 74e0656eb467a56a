"""SIGINT / SIGTERM during training: finish the current update, checkpoint it, tell how to resume.

    with StopSignals() as stop:
        while ...:
            update()
            if stop.received: save(); break

The first signal only sets a flag (the update in flight completes, so the checkpoint is a real
update boundary and resuming is step-exact); the handlers that were installed before are put back
on exit. Outside the main thread (where Python cannot install handlers) it does nothing.
"""

from __future__ import annotations

import shlex
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


def resume_command(config: str, overrides: list[str], resume: bool, resume_from: str | None) -> str:
    """The command that continues this run from its newest checkpoint in out_dir."""
    extra = []
    if resume_from:  # resuming again from resume_from would throw the new updates away
        extra += ["--checkpoint.resume_from", "none"]
    if not resume:
        extra += ["--checkpoint.resume", "true"]
    return shlex.join(["slimlm", "train", config, *overrides, *extra])
