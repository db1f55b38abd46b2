"""A scripted stand-in for the generate stage, for runtime tests where the model does not matter:
it reads concept sets and writes one verdict per set, with a random outcome (so a second decision
for the same id would show), and misbehaves on request.

Run as a script it is a worker process (``python tests/scripted_stage.py``), configured by
environment variables, that stops gracefully on SIGTERM like ``promptcot worker``; the test gate
(tests/gate.py, ``TEST_GATE_AT=__main__:ScriptedStage.process``) holds it mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.backends.base import UnreachableError  # noqa: E402
from streams.records import ConceptSet, Verdict  # noqa: E402
from streams.topics import CONCEPTS, VERDICTS  # noqa: E402
from workers.stage import Emit, Stage  # noqa: E402


class ScriptedStage(Stage[ConceptSet]):
    """Concept markers steer it: a set whose concepts include "poison" raises, "huge" yields a
    verdict over any size limit, "surrogate" a verdict holding a lone surrogate (text no
    encoder takes, as a model server may return), "wrongtype" the concept set itself to the
    verdicts topic, "slow" sleeps ``slow_s``. ``transient`` failures come first."""

    name = "generate"
    input = CONCEPTS
    outputs = (VERDICTS,)

    def __init__(
        self,
        settings,
        *,
        delay_s: float = 0.0,
        slow_s: float = 2.0,
        transient: int = 0,
        chunk: int | None = None,
        in_flight: int | None = None,
        log_path: str | None = None,
    ):
        super().__init__(settings)
        self.delay_s, self.slow_s, self.transient = delay_s, slow_s, transient
        self._chunk, self._in_flight = chunk, in_flight
        self.log_path = log_path
        self.calls: list[list[str]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def chunk_size(self, batch_size: int) -> int:
        return self._chunk or batch_size

    def default_in_flight(self, batch_size: int) -> int:
        return self._in_flight or batch_size

    def concurrent(self) -> bool:  # a chunk of one stands for a continuous-batching server
        return self._chunk == 1

    def process(self, records: list[ConceptSet]) -> list[Emit]:
        with self._lock:
            self.calls.append([r.id for r in records])
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.transient > 0:
                self.transient -= 1
                self.active -= 1
                raise UnreachableError("the model server is away")
        try:
            if any("poison" in r.concepts for r in records):
                raise ValueError("poisoned record")
            time.sleep(self.delay_s)
            if any("slow" in r.concepts for r in records):
                time.sleep(self.slow_s)
            out = []
            for r in records:
                verdict = Verdict.derived_from(
                    r,
                    subject_id=r.id,
                    stage="generate",
                    accepted=random.random() < 0.5,
                    reason="scripted",
                    domain=r.domain,
                    concepts=r.concepts,
                    detail="x" * 2_000
                    if "huge" in r.concepts
                    else ("a lone \ud800 surrogate" if "surrogate" in r.concepts else ""),
                    problem="y" * 2_000_000 if "huge" in r.concepts else "",
                )
                out.append(Emit(VERDICTS, r if "wrongtype" in r.concepts else verdict))
            if self.log_path:  # what this process decided, for the subprocess tests
                with open(self.log_path, "a") as f:
                    for v in (e.record for e in out if isinstance(e.record, Verdict)):
                        f.write(json.dumps([v.subject_id, v.accepted]) + "\n")
            return out
        finally:
            with self._lock:
                self.active -= 1


def _main() -> None:
    """A worker process: PROMPTCOT_* settings from the environment, SCRIPTED_* for the stage."""
    from gate import install_from_env

    from promptcot.settings import load_settings
    from workers.runtime import run_stages

    install_from_env()
    settings = load_settings()
    stage = ScriptedStage(
        settings,
        delay_s=float(os.environ.get("SCRIPTED_DELAY_S", "0")),
        chunk=int(os.environ["SCRIPTED_CHUNK"]) if "SCRIPTED_CHUNK" in os.environ else None,
        in_flight=int(os.environ["SCRIPTED_IN_FLIGHT"])
        if "SCRIPTED_IN_FLIGHT" in os.environ
        else None,
        log_path=os.environ.get("SCRIPTED_LOG"),
    )

    async def until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print("worker ready", flush=True)
        await stop.wait()
        print("worker stopping", flush=True)

    asyncio.run(
        run_stages(
            settings,
            [stage],
            settings.kafka.bootstrap_servers,
            app_id=os.environ.get("SCRIPTED_GROUP"),
            until=until_signal,
        )
    )
    print("worker stopped", flush=True)
    os._exit(0)  # like `promptcot worker`: a thread still inside process() must not hold us


if __name__ == "__main__":
    _main()
