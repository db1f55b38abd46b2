"""Every user error of the CLI is one line on stderr and a non-zero exit, never a traceback;
``--debug`` shows the traceback instead. Each case runs the real ``python -m promptcot`` in a
subprocess and checks the exact line and exit code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from promptcot.registry import STAGES
from streams.broker import EmbeddedBroker
from streams.topics import CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ", ".join(CATALOGUE)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections are refused


@pytest.fixture(scope="module")
def busy_port():
    """A port held by a real broker: `promptcot broker --port` on it must refuse."""
    with EmbeddedBroker() as b:
        yield b.port


def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "typo": "kafka:\n  namespacee: team-a\n",
        "type": "kafka:\n  partitions: many\n",
        "syntax": "kafka:\n  namespace: [unclosed\n",
        "list": "- kafka\n- models\n",
    }
    out = {}
    for name, text in files.items():
        out[name] = tmp / f"{name}.yaml"
        out[name].write_text(text)
    # Two eval results (`promptcot eval --out`) on different items: --compare refuses them.
    for name, ids in (("two", ["test-1", "test-2"]), ("one", ["test-1"])):
        items = [{"id": i, "reference": "1", "answer": "1", "correct": True} for i in ids]
        result = {"benchmark": "gsm8k", "n": len(items), "items": items}
        out[name] = tmp / f"{name}.json"
        out[name].write_text(json.dumps(result))
    return out


# (id, args, extra env, exit code, the one stderr line); {tmp}, {port}, {busy} filled in per run.
CASES = [
    (
        "unknown key in YAML",
        ["config", "-c", "{tmp}/typo.yaml"],
        {},
        1,
        "error: settings: kafka.namespacee (file {tmp}/typo.yaml): unknown key; "
        "did you mean namespace?",
    ),
    (
        "unknown nested key in an env var",
        ["config"],
        {"PROMPTCOT_MODELS__SOLVER__KINDD": "openai"},
        1,
        "error: settings: models.solver.kindd (env PROMPTCOT_MODELS__SOLVER__KINDD): unknown key; "
        "did you mean kind?",
    ),
    (
        "unknown section in an env var",
        ["config"],
        {"PROMPTCOT_KAFKAA__NAMESPACE": "team-a"},
        1,
        "error: settings: kafkaa (env PROMPTCOT_KAFKAA__NAMESPACE): unknown key; "
        "did you mean kafka?",
    ),
    (
        "nested env var with one underscore",
        ["config"],
        {"PROMPTCOT_KAFKA_BOOTSTRAP_SERVERS": "k1:9092"},
        1,
        "error: settings: PROMPTCOT_KAFKA_BOOTSTRAP_SERVERS: not a setting; nested keys take "
        "two underscores: PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS",
    ),
    (
        "wrong type in YAML",
        ["config", "-c", "{tmp}/type.yaml"],
        {},
        1,
        "error: settings: kafka.partitions (file {tmp}/type.yaml): Input should be a valid "
        "integer, unable to parse string as an integer (got 'many')",
    ),
    (
        "wrong type in an env var",
        ["config"],
        {"PROMPTCOT_METRICS__PORT": "http"},
        1,
        "error: settings: metrics.port (env PROMPTCOT_METRICS__PORT): Input should be a valid "
        "integer, unable to parse string as an integer (got 'http')",
    ),
    (
        "YAML syntax error",
        ["config", "-c", "{tmp}/syntax.yaml"],
        {},
        1,
        "error: settings: {tmp}/syntax.yaml: not valid YAML at line 3, column 1: expected ',' or "
        "']', but got '<stream end>'",
    ),
    (
        "YAML that is not a mapping",
        ["config", "-c", "{tmp}/list.yaml"],
        {},
        1,
        "error: settings: {tmp}/list.yaml: not a mapping of settings (its top level is a list)",
    ),
    (
        "missing config file",
        ["config", "-c", "{tmp}/nope.yaml"],
        {},
        1,
        "error: settings: config file not found: {tmp}/nope.yaml",
    ),
    (
        "missing config file from PROMPTCOT_CONFIG",
        ["topics"],
        {"PROMPTCOT_CONFIG": "{tmp}/nope.yaml"},
        1,
        "error: settings: config file not found: {tmp}/nope.yaml",
    ),
    (
        "unreachable bootstrap server",
        ["worker", "sink", "--bootstrap", "127.0.0.1:{port}"],
        {},
        1,
        "error: cannot reach Kafka at 127.0.0.1:{port} within 10 s (KafkaTimeoutError)",
    ),
    (
        "tail of a topic not in the catalogue",
        ["tail", "nosuch", "--bootstrap", "127.0.0.1:{port}"],
        {},
        2,
        f"error: unknown topic 'nosuch'; topics: {TOPICS} (see promptcot tail --help)",
    ),
    (
        "broker on a port in use",
        ["broker", "--port", "{busy}"],
        {},
        1,
        "error: cannot start the embedded broker: 127.0.0.1:{busy} is already in use",
    ),
    (
        "worker with an unknown stage",
        ["worker", "nosuch"],
        {},
        2,
        f"error: unknown stage 'nosuch'; stages: {', '.join(STAGES)} (see promptcot worker --help)",
    ),
    (
        "worker without its stage",
        ["worker"],
        {},
        2,
        "error: Missing argument 'stage'. (see promptcot worker --help)",
    ),
    (
        "unknown command",
        ["nosuch"],
        {},
        2,
        "error: No such command 'nosuch'. (see promptcot --help)",
    ),
    (
        "bad duration",
        ["up", "--duration", "soon"],
        {},
        2,
        "error: not a duration: 'soon' (examples: 90s, 25m, 1h30m) (see promptcot up --help)",
    ),
    (
        "eval with a batch size of 0",
        ["eval", "--batch-size", "0", "{tmp}"],
        {},
        2,
        "error: Invalid value for '--batch-size': Input should be greater than or equal to 1 "
        "(see promptcot eval --help)",
    ),
    (
        "eval of an unknown benchmark",
        ["eval", "--benchmark", "gsm8", "{tmp}"],
        {},
        2,
        "error: --benchmark: unknown benchmark 'gsm8' (known: gsm8k, aime24, "
        "aime25, hmmt25) (see promptcot eval --help)",
    ),
    (
        "eval --gold-nll-only of a benchmark without worked solutions",
        ["eval", "--gold-nll-only", "--benchmark", "aime24", "{tmp}"],
        {},
        2,
        "error: --gold-nll-only: aime24 ships no worked solutions (gold NLL: gsm8k only) "
        "(see promptcot eval --help)",
    ),
    (
        "eval of a MODEL and --compare at once",
        ["eval", "{tmp}", "--compare", "{tmp}/one.json", "{tmp}/two.json"],
        {},
        2,
        "error: give MODEL or --compare A B, not both (MODEL: {tmp}) (see promptcot eval --help)",
    ),
    (
        "eval --compare of results on different items",
        ["eval", "--compare", "{tmp}/two.json", "{tmp}/one.json"],
        {},
        1,
        "error: A and B were scored on different items (2 and 1, 1 shared): score both with the "
        "same --limit / --all",
    ),
    (
        "eval --compare of a file that is not a result",
        ["eval", "--compare", "{tmp}/typo.yaml", "{tmp}/one.json"],
        {},
        1,
        "error: {tmp}/typo.yaml: not JSON (Expecting value, line 1)",
    ),
    (
        "eval --compare of a path that is neither",
        ["eval", "--compare", "{tmp}/nope", "{tmp}/one.json"],
        {},
        2,
        "error: --compare A: not a model folder or an eval JSON: {tmp}/nope "
        "(see promptcot eval --help)",
    ),
    (
        "--debug shows the traceback",
        ["--debug", "config", "-c", "{tmp}/nope.yaml"],
        {},
        1,
        "promptcot.settings.SettingsError: config file not found: {tmp}/nope.yaml",
    ),
    (
        "export from a sink folder that does not exist",
        ["export", "--out", "{tmp}/x.parquet"],
        {"PROMPTCOT_SINK__OUTPUT_DIR": "{tmp}/no-sink"},
        1,
        "error: no problems folder at {tmp}/no-sink/problems (sink.output_dir is {tmp}/no-sink); "
        "nothing to export",
    ),
]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCOT_")}
    base.update(env, PYTHONPATH=str(ROOT), COLUMNS="80")  # narrow: a line must not wrap
    return subprocess.run(
        [sys.executable, "-m", "promptcot", *args],
        env=base,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "env", "code", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_user_error_is_one_line_and_a_non_zero_exit(args, env, code, line, tmp_path, busy_port):
    _files(tmp_path)
    fill = {"tmp": str(tmp_path), "port": str(_closed_port()), "busy": str(busy_port)}
    args = [a.format(**fill) for a in args]
    result = _run(args, {k: v.format(**fill) for k, v in env.items()}, tmp_path)
    lines = result.stderr.splitlines()
    if "--debug" in args:  # the traceback, ending in the error itself
        assert lines[0] == "Traceback (most recent call last):", result.stderr
        assert lines[-1] == line.format(**fill), result.stderr
    else:
        assert lines == [line.format(**fill)], result.stderr
    assert result.returncode == code
    assert "broker ready" not in result.stdout
