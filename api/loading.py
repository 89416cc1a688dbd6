"""A model that may still be loading: the server starts at once and answers "loading" until it is ready.

``load(progress)`` runs on its own thread and returns a ``TextModel``; it may call
``progress(stage, done, total)`` as it goes (fragments fetched and verified, for example), which
/health, /info and the web page show.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class LoadingModel:
    def __init__(self, load: Callable | None = None, text_model=None):
        self.text_model = text_model
        self.status = "ready" if text_model is not None else "loading"
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.stage, self.done, self.total = ("ready", None, None) if text_model is not None else ("starting", None, None)
        self.unit: str | None = None
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.ready_event = threading.Event()
        self.lock = threading.Lock()
        if text_model is not None:
            self.ready_event.set()
        elif load is not None:
            self.thread = threading.Thread(target=self._load, args=(load,), name="api-load", daemon=True)
            self.thread.start()

    def progress(self, stage: str, done: int | None = None, total: int | None = None, unit: str | None = None) -> None:
        """The current stage, and how far it is (``done`` of ``total`` ``unit``s: "B" for bytes) when known."""
        with self.lock:
            self.stage, self.done, self.total, self.unit = stage, done, total, unit

    def _load(self, load: Callable) -> None:
        try:
            model = load(self.progress)
        except BaseException as e:  # noqa: BLE001 - reported by /health and by the command
            with self.lock:
                self.exception = e
                self.status, self.error, self.stage = "failed", str(e) or type(e).__name__, "failed"
        else:
            with self.lock:
                self.text_model, self.status, self.stage, self.done, self.total = model, "ready", "ready", None, None
        self.ready_event.set()

    def snapshot(self) -> dict:
        """What /health and the page show: status, stage, and progress as a fraction when known."""
        with self.lock:
            out = {"status": self.status, "stage": self.stage}
            if self.total:
                out.update(done=self.done, total=self.total, progress=round((self.done or 0) / self.total, 4))
                if self.unit:
                    out["unit"] = self.unit
            if self.status == "loading":
                out["elapsed_s"] = round(time.monotonic() - self.started, 1)
            if self.error:
                out["error"] = self.error
            return out
