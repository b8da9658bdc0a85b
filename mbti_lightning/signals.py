"""Stopping a command on SIGTERM (a cluster's preemption, a supervisor's stop) or SIGINT (Ctrl-C).

Lightning's trainer only notes a SIGTERM (its own handler logs "Received SIGTERM" and goes on where no loop checks
it, as prediction does), so `report` and the export ran on for minutes. `stop_on_signals` makes either signal raise
`Stopped` wherever the command is; Lightning's trainer passes a signal on to the handler that was there before it,
and tears itself down on the exception. What the command was writing is written atomically (`cache.atomic_open`,
`cache.atomic_folder`), so a stop leaves the old output or none, never half of a new one; the command exits with
128 + the signal's number. A second signal ends the process at once. The server stops its own way (`serve`).
"""

from __future__ import annotations

import signal


class Stopped(BaseException):  # not an Exception: no `except Exception` may swallow a stop
    """A stop signal was received."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}; nothing half-written was left"


def stop_on_signals() -> None:
    """From now on, SIGTERM and SIGINT raise `Stopped` (once: a second one has the system's default effect)."""

    def stop(signum: int, frame: object) -> None:
        for other in (signal.SIGTERM, signal.SIGINT):
            signal.signal(other, signal.SIG_DFL)
        raise Stopped(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
