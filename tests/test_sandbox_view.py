"""What the sandbox sees (verification/sandbox/view.py): only the interpreter's own paths,
read-only, enough for every standard-library extension module, and nothing of the host besides."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from sandbox_helpers import BACKENDS, assert_no_leftovers, sandbox_fixture
except ImportError:  # pragma: no cover
    from tests.sandbox_helpers import BACKENDS, assert_no_leftovers, sandbox_fixture

from verification.sandbox import Sandbox
from verification.sandbox.view import _elf_interpreter, _resolve, interpreter_view

PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    yield from sandbox_fixture(request.param, slots=1)


def test_view_is_the_interpreter_and_its_libraries() -> None:
    view = interpreter_view(PYTHON)
    assert view.python == os.path.realpath(PYTHON)
    assert view.python in view.ro_paths
    for path in view.ro_paths:
        assert os.path.exists(path) and not os.path.islink(path)
        assert not path.startswith(
            (
                "/etc",
                "/home",
                "/root",
                "/work",
                "/tmp",
                "/var",
                "/run",
                "/dev",
                "/proc",
                "/sys",
                "/opt",
                "/srv",
                "/mnt",
            )
        )
    assert any(p.rsplit("/", 1)[-1].startswith("libc.so") for p in view.ro_paths)
    loader = _elf_interpreter(view.python)
    assert loader is not None
    links, real = _resolve(loader)
    assert real in view.ro_paths
    assert set(links) <= set(view.symlinks)  # e.g. /lib64 -> usr/lib64


def test_view_keeps_site_packages_out_with_dash_s() -> None:
    assert not any("-packages" in p for p in interpreter_view(PYTHON, ("-S",)).ro_paths)


def test_resolve_follows_every_symlink(tmp_path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "file").write_text("x")
    (tmp_path / "dir").symlink_to("real")
    (tmp_path / "real" / "alias").symlink_to("file")
    links, real = _resolve(str(tmp_path / "dir" / "alias"))
    assert real == str(tmp_path / "real" / "file")
    assert links == [(str(tmp_path / "dir"), "real"), (str(tmp_path / "real" / "alias"), "file")]


def test_extension_modules_work_inside(sandbox: Sandbox) -> None:
    program = (
        "import ctypes, decimal, hashlib, json, math, sqlite3, ssl, lzma, bz2, zlib, "
        "array, bisect, heapq, itertools, collections, fractions, re, random\n"
        "print(decimal.Decimal(1) / 7, sqlite3.connect(':memory:').execute('select 2')"
        ".fetchone()[0], ctypes.sizeof(ctypes.c_long), zlib.crc32(b'x'))\n"
    )
    result = sandbox.run(program)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(b"0.1428571428571428571428571429 2 8 ")
    assert_no_leftovers(sandbox)


def test_no_shell_and_no_host_binaries_inside(sandbox: Sandbox) -> None:
    program = (
        "import os\nfor p in ['/bin/sh', '/usr/bin/env', '/usr/bin/sleep', '/usr/bin/sudo',"
        " '/usr/bin/setpriv', '/usr/bin/bwrap', '/etc/ld.so.cache', '/usr/share']:\n"
        "    print(p, os.path.exists(p))\n"
        "print(sorted(os.listdir('/usr/bin')))\n"
    )
    result = sandbox.run(program)
    assert result.exit_code == 0, result.stderr
    assert b"True" not in result.stdout.split(b"[")[0], result.stdout
    assert_no_leftovers(sandbox)
