"""uvicorn, with SIGTERM treated as a normal stop."""

from __future__ import annotations

import signal

import uvicorn


class GracefulServer(uvicorn.Server):
    """On SIGTERM: stop accepting, let running requests finish (up to the graceful timeout),
    shut the engine down, exit 0. (uvicorn itself re-raises the signal after shutting down.)"""

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)
