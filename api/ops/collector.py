"""What the server's cyclic garbage collector leaves out of its passes: everything startup built.

The schema, the modules and the app's wiring are never garbage, yet every full pass of CPython's
collector traversed them again. Once startup is done they are frozen (`gc.freeze()`) after one
collection, so full passes walk only what serving made. CPython's own schedule is kept: a full
pass each time the long-lived heap has grown by a quarter, which is what bounds the memory cyclic
garbage can hold. (Full passes on a one-minute clock instead removed the pauses while 1,000
sockets connected, but request handling promotes cyclic garbage faster than that: a server's RSS
grew from ~100 MB to 400-500 MB over a few minutes of load.)"""

from __future__ import annotations

import gc


class Collector:
    """Startup's objects frozen for one server process, from `start()` to `stop()`."""

    def __init__(self) -> None:
        self.frozen = False

    def start(self) -> None:
        if self.frozen:
            return
        gc.collect()  # startup's garbage is freed, not frozen
        gc.freeze()
        self.frozen = True

    def stop(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
