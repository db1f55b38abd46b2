"""The Typer app, the options every command shares, and the error boundary."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages or disk, never a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

app = typer.Typer(
    help="PromptCoT 2.0 as a streaming factory of verified reasoning problems.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # --debug prints Python's own traceback: paste-able
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (PROMPTCOT_CONFIG).")
]
BootstrapOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap", help="Kafka bootstrap servers (PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS)."
    ),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """PromptCoT 2.0 as a streaming factory of verified reasoning problems."""
    _state["debug"] = debug


def load(config: Path | None, bootstrap: str | None = None, **overrides: Any) -> Any:
    """The settings of a command (``--config``, ``--bootstrap`` and ``overrides``, a mapping per
    section, on top), with logging set."""
    from promptcot.settings import load_settings

    if bootstrap:
        overrides["kafka"] = {**overrides.get("kafka", {}), "bootstrap_servers": bootstrap}
    settings = load_settings(config, **overrides)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kafka-python warns whenever one of its own poll tasks runs over 0.1 s, which on a busy
    # 2-core machine is every few seconds and says nothing a user can act on.
    if settings.log_level.upper() != "DEBUG":
        logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    return settings


def require_cluster(settings: Any) -> str:
    """The configured bootstrap servers, checked reachable (one clear line if not)."""
    from streams.cluster import check_reachable

    if not settings.kafka.bootstrap_servers:
        raise typer.BadParameter(
            "this command talks to a cluster: set PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS or "
            "--bootstrap (`promptcot broker` starts a local one)"
        )
    check_reachable(settings.kafka, settings.kafka.bootstrap_servers)
    return settings.kafka.bootstrap_servers


def parse_duration(text: str) -> float:
    """'90s', '25m', '1h30m', '2 hours' or plain seconds (pytimeparse2), and positive."""
    from pytimeparse2 import parse

    seconds = parse(text.strip())
    if seconds is None or seconds <= 0:
        raise typer.BadParameter(f"not a duration: {text!r} (examples: 90s, 25m, 1h30m)")
    return float(seconds)


def main(argv: list[str] | None = None) -> None:
    """The ``promptcot`` entry point: one line and a non-zero exit for every error (2 for a
    wrong command line, 1 for the rest); ``--debug`` shows the traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("PROMPTCOT_DEBUG") == "1"
    try:
        code = app(args=args, prog_name="promptcot", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        code = 130
    except Exception as exc:  # noqa: BLE001 - the boundary: one line unless --debug
        if debug or _state["debug"]:
            raise
        err_console.print(f"[red]error:[/] {describe(exc)}", highlight=False, soft_wrap=True)
        code = getattr(exc, "exit_code", 1) if isinstance(exc, typer.TyperException) else 1
    sys.exit(code if isinstance(code, int) else 0)


def describe(exc: BaseException) -> str:
    """The one line a user reads for an error."""
    from promptcot.settings import SettingsError

    if isinstance(exc, typer.BadParameter) and exc.param is None and exc.param_hint is None:
        return f"{exc.message}{_help_hint(exc)}"  # raised by a command: its text says it all
    if isinstance(exc, typer.TyperException):  # usage errors from the command line parser
        return f"{exc.format_message()}{_help_hint(exc)}"
    if isinstance(exc, SettingsError):
        return "settings: " + "; ".join(exc.problems)
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    text = " ".join(str(exc).split()) or type(exc).__name__
    known = ("BrokerError", "ClusterUnreachable", "ModelPreparationError", "StartupError")
    if type(exc).__name__ in known or isinstance(exc, (OSError, ValueError)):
        return text
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


def _help_hint(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    return f" (see {ctx.command_path} --help)" if ctx is not None else ""
