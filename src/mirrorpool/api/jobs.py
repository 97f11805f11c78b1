"""Long work started by the API (restores), polled for progress."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from mirrorpool.errors import MirrorpoolError, NotFound

Work = Callable[[Callable[[int, int], None]], Any]


class Job:
    def __init__(self, kind: str, lu: str) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.kind = kind
        self.lu = lu
        self.state = "running"
        self.done = 0
        self.total = 0
        self.result: Any = None
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None

    def as_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "lu": self.lu, "state": self.state,
                "done": self.done, "total": self.total, "result": self.result,
                "error": self.error, "started": self.started, "finished": self.finished}


class Jobs:
    def __init__(self, keep: int = 100) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def start(self, kind: str, lu: str, work: Work) -> Job:
        job = Job(kind, lu)

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        def run() -> None:
            try:
                job.result = work(progress)
                job.state = "done"
            except MirrorpoolError as exc:
                job.error, job.state = str(exc), "failed"
            except Exception as exc:  # reported to the user, not swallowed
                job.error, job.state = f"internal error: {exc}", "failed"
            job.finished = time.time()

        with self._lock:
            self._jobs[job.id] = job
            for old in list(self._jobs)[: -self._keep]:
                del self._jobs[old]
        threading.Thread(target=run, name=f"job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job
