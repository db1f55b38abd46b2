"""`promptcot loopback-server`: a model server with set latency and no model, for benchmarks
(llm/backends/loopback.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Literal

import typer

from promptcot.cli.app import app, console


@app.command("loopback-server")
def loopback_server(
    port: Annotated[int, typer.Option(help="Port on the host (0: a free one).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    model: Annotated[str, typer.Option(help="Served model name.")] = "loopback",
    latency_s: Annotated[float, typer.Option(help="Seconds per request.")] = 0.0,
    per_token_s: Annotated[float, typer.Option(help="Seconds per generated token.")] = 0.0,
    capacity: Annotated[int, typer.Option(help="Requests served at once; more wait.")] = 256,
    text: Annotated[str, typer.Option(help="seeded (words) or echo (the prompt).")] = "seeded",
    seed: Annotated[int, typer.Option(help="Seed of the generated words.")] = 0,
    max_model_len: Annotated[int, typer.Option(help="Context length in tokens.")] = 4096,
) -> None:
    """Serve /v1/completions and /v1/models without a model: each request takes latency-s +
    per-token-s x tokens. GET /stats reports requests in flight over time."""
    from llm.backends.loopback import LoopbackSettings, serve
    from promptcot.cli.launch import until_signal

    if text not in ("seeded", "echo"):
        raise typer.BadParameter(f"--text must be seeded or echo, not {text!r}")
    mode: Literal["seeded", "echo"] = "echo" if text == "echo" else "seeded"
    settings = LoopbackSettings(
        host=host,
        port=port,
        model=model,
        latency_s=latency_s,
        per_token_s=per_token_s,
        capacity=capacity,
        text=mode,
        seed=seed,
        max_model_len=max_model_len,
    )

    async def run() -> None:
        stop = asyncio.Event()
        waiter = asyncio.ensure_future(until_signal())
        waiter.add_done_callback(lambda _: stop.set())

        def ready(url: str) -> None:
            console.print(f"loopback server ready: {url}", highlight=False, soft_wrap=True)

        await serve(settings, ready, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
