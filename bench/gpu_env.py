"""What the GPU check (bench/gpu_check.py) needs installed, and the wheels that carry what a bare
CUDA image lacks (docs/training.md, "Checking a GPU").

Two halves, both run through ``ops/gpu-check.sh``:

- ``prepare`` (the CPU machine, with a package registry): ``pip download --no-deps`` of the
  pure-Python wheels in ``CARRIED`` (at the versions installed here, the ones the suite tests)
  into a git-ignored folder, beside SmolLM2-135M's config and tokenizer (its weights are not
  carried: the check initialises the architecture at random).
- ``ensure`` (the GPU machine, no network): walk the requirements of ``NEEDS`` (the versions
  pyproject.toml asks for, then each package's own requirements), print every version, install
  from the carried wheels only what is missing or does not fit, and stop with one line naming
  the first requirement nothing satisfies.

Nothing here imports a third-party package but ``packaging`` (there on every image with pip),
so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".gpu-check"  # git-ignored; ops/gpu-check.sh carries it to the GPU machine

# The project's dependencies the check imports; the versions come from pyproject.toml, and each
# one's own requirements are followed (tests/test_gpu_check.py fails when the check imports a
# distribution outside that closure and NOT_CHECKED).
NEEDS = (
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "numpy",
    "pydantic",
    "pydantic-settings",
    "pyyaml",
    "prometheus-client",
    "cachetools",
    "math-verify",
)
# Imported but not checked: by transformers, scikit-learn, pandas, numpy or torch when present
# (none requires them: pandas and its python-dateutil and pyarrow by scikit-learn, dill by
# torch.utils.data, charset-normalizer by numpy.f2py), and setuptools, jinja2 and markupsafe by
# torch (its requirements are the CUDA image's own, see UNPINNED).
NOT_CHECKED = frozenset(
    {"click", "cloudpickle", "joblib", "narwhals", "pillow", "pytz", "scikit-learn", "scipy"}
    | {"threadpoolctl", "setuptools", "jinja2", "markupsafe", "dill", "charset-normalizer"}
    | {"pandas", "python-dateutil", "pyarrow"}
)
# pyproject pins the CPU build of torch; a CUDA image brings its own, whatever its version, with
# the CUDA libraries it was built against: neither its version nor its requirements are checked.
UNPINNED = {"torch"}

# What travels as wheels, and why. Each is installed on the GPU machine only when the image's
# own version is missing or does not fit (``ensure``).
CARRIED: dict[str, str] = {
    "peft": "pyproject pins peft==0.21.2; the image's version is not known ahead",
    "pydantic": "the settings and records; not on the image",
    "pydantic-core": "pydantic's compiled core (cp312 manylinux wheel)",
    "annotated-types": "pydantic needs it; not on the image",
    "typing-inspection": "pydantic needs it; not on the image",
    "typing-extensions": "pydantic 2.14 needs >=4.16; the image's may be older",
    "pydantic-settings": "the root settings (promptcot/settings.py); not on the image",
    "python-dotenv": "pydantic-settings needs it; not on the image",
    "prometheus-client": "pyproject pins 0.26.0 (streams/metrics.py); the image's is not known",
    "cachetools": "the eval's equivalence oracle (verification/mathcheck/oracle.py); "
    "not on the image",
    "math-verify": "the eval's equivalence oracle; not on the image",
    "latex2sympy2-extended": "math-verify needs it; not on the image",
    "antlr4-python3-runtime": "math-verify's LaTeX parser (pyproject: math-verify[antlr4_13_2])",
}
# The CUDA image's Python (docs/training.md): the one compiled wheel is built for it.
IMAGE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# SmolLM2's files the check carries: the architecture and the tokenizer, not the weights.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


# ---------------------------------------------------------------------------------------------
# Requirements


@dataclass(frozen=True)
class Dist:
    version: str
    requires: tuple[str, ...] = ()


@dataclass
class Unmet:
    name: str  # canonical
    found: str | None  # the installed version, None: missing
    wants: list[str] = field(default_factory=list)  # "peft 0.21.2 needs accelerate>=0.21.0"
    specs: list[Requirement] = field(default_factory=list)

    def line(self) -> str:
        have = f"{self.name} {self.found} is installed" if self.found else f"{self.name} is missing"
        return f"{have} ({'; '.join(self.wants)})"


def installed(name: str) -> Dist | None:
    """The distribution the interpreter would import (the first on sys.path)."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    return Dist(dist.version, tuple(dist.requires or ()))


def pyproject_requirements(names: Iterable[str] = NEEDS) -> list[Requirement]:
    """``names`` with the versions and extras pyproject.toml asks for (torch unpinned)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {canonicalize_name(r.name): r for r in map(Requirement, deps)}
    out = []
    for name in names:
        key = canonicalize_name(name)
        if key in pinned and key not in UNPINNED:
            out.append(pinned[key])
        else:
            out.append(Requirement(name))
    return out


def ours(roots: Iterable[Requirement], carried: Iterable[str]) -> Callable[[str], bool]:
    """The packages whose own requirements ``ensure`` checks: the roots and what travels as
    wheels. The image's other packages (and its torch) are taken as the image made them."""
    names = {canonicalize_name(r.name) for r in roots} | {canonicalize_name(n) for n in carried}
    return (names - UNPINNED).__contains__


def walk(
    roots: Iterable[Requirement],
    dist: Callable[[str], Dist | None] = installed,
    follow: Callable[[str], bool] = lambda name: name not in UNPINNED,
) -> Iterator[tuple[Requirement, str, Dist | None]]:
    """(requirement, who asks for it, the installed distribution) over the closure of ``roots``:
    the requirements of each met one that ``follow`` names (with the extras asked of it,
    markers evaluated for this interpreter) are followed from the version installed."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[Requirement, str]] = [(r, "pyproject.toml") for r in roots]
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        have = dist(name)
        yield req, by, have
        key = (name, frozenset(req.extras))
        met = have is not None and req.specifier.contains(have.version, True)
        if not met or key in seen or not follow(name):
            continue
        seen.add(key)
        extras = ["", *sorted(req.extras)]
        for line in have.requires:  # type: ignore[union-attr]
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append((sub, f"{req.name} {have.version}"))


def unmet(
    roots: Iterable[Requirement],
    dist: Callable[[str], Dist | None] = installed,
    follow: Callable[[str], bool] = lambda name: name not in UNPINNED,
) -> list[Unmet]:
    """Every requirement the installed versions do not meet: of ``roots``, and of the packages
    ``follow`` names among what they reach."""
    found: dict[str, Unmet] = {}
    for req, by, have in walk(roots, dist, follow):
        if have is None or not req.specifier.contains(have.version, prereleases=True):
            name = canonicalize_name(req.name)
            miss = found.setdefault(name, Unmet(name, have.version if have else None))
            miss.wants.append(f"{by} needs {req.name}{req.specifier or ''}")
            miss.specs.append(req)
    return sorted(found.values(), key=lambda u: u.name)


def closure(
    roots: Iterable[Requirement], dist: Callable[[str], Dist | None] = installed
) -> dict[str, str]:
    """Canonical name -> installed version of every distribution the closure of ``roots``
    reaches (torch's own requirements left out)."""
    return {canonicalize_name(r.name): have.version for r, _, have in walk(roots, dist) if have}


def wheels_in(folder: Path) -> dict[str, tuple[Version, Path]]:
    """Canonical name -> (version, file) of the wheels in ``folder``."""
    out = {}
    for path in sorted(Path(folder).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        out[canonicalize_name(name)] = (version, path)
    return out


def plan(missing: list[Unmet], wheels: dict[str, tuple[Version, Path]]) -> tuple[list[Path], str]:
    """The carried wheels that meet the unmet requirements, and the line that says what nothing
    carried meets ('' when every one is met)."""
    chosen = []
    for miss in missing:
        wheel = wheels.get(miss.name)
        if wheel is None or not all(r.specifier.contains(wheel[0], True) for r in miss.specs):
            carried = f"carried: {wheel[0]}" if wheel else "not carried"
            return [], f"{miss.line()}; {carried}"
        chosen.append(wheel[1])
    return chosen, ""


class EnvironmentProblem(SystemExit):
    """A needed package missing or incompatible, and not among the carried wheels: one line."""

    def __init__(self, line: str):
        super().__init__(f"gpu-check: {line}")


def ensure(
    wheel_dir: Path | None,
    target: Path | None = None,
    roots: list[Requirement] | None = None,
    rounds: int = 4,
) -> dict[str, str]:
    """Make every requirement of ``roots`` (``NEEDS`` at pyproject.toml's versions) importable:
    install the carried wheels that fill what the interpreter lacks into ``target`` (None: a
    temporary one, made when something is installed; put first on the path), until nothing is
    unmet. Returns name -> 'version' or 'version (carried)'; raises EnvironmentProblem with one
    line when a requirement is met by nothing carried."""
    roots = roots if roots is not None else pyproject_requirements()
    wheels = wheels_in(wheel_dir) if wheel_dir and Path(wheel_dir).is_dir() else {}
    follow = ours(roots, [*CARRIED, *wheels])
    for attempt in range(rounds + 1):
        missing = unmet(roots, follow=follow)
        if not missing:
            break
        if attempt == rounds:  # each round installs what the last one's wheels asked for
            raise EnvironmentProblem(missing[0].line())
        chosen, problem = plan(missing, wheels)
        if problem:
            hint = "" if wheels else " (no wheel folder: run `ops/gpu-check.sh prepare` first)"
            raise EnvironmentProblem(problem + hint)
        if target is None:
            target = Path(tempfile.mkdtemp(prefix="promptcot-gpu-check-")) / "site-packages"
        target.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        pip += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
        done = subprocess.run([*pip, *map(str, chosen)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise EnvironmentProblem(f"pip could not install the carried wheels: {last}")
        put_first(target)
    where = {}
    for name, version in sorted(closure(roots).items()):
        origin = Path(str(md.distribution(name).locate_file(""))).resolve()
        carried = target is not None and origin == target.resolve()
        where[name] = f"{version} (carried)" if carried else version
    return where


def put_first(folder: Path) -> None:
    """``folder`` first on this process's path and on its subprocesses' (the eval's math
    oracle runs in a worker process of its own)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        rest = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(folder) + (os.pathsep + rest if rest else "")
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------------------------
# prepare: on the CPU machine


def download_wheels(dest: Path, python_version: str = IMAGE_PYTHON) -> list[Path]:
    """``pip download --no-deps`` of CARRIED at the versions installed here, for the image's
    Python on x86-64 Linux (pure-Python wheels but pydantic-core)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each: two stop the install
        old.unlink()
    pins = [f"{name}=={md.version(name)}" for name in CARRIED]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *pins], check=True)
    return sorted(dest.glob("*.whl"))


def copy_model_files(source: Path, dest: Path) -> list[Path]:
    """The config and tokenizer of a model folder, without its weights."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in MODEL_FILES:
        if (source / name).is_file():
            copied.append(Path(shutil.copy2(source / name, dest / name)))
    if not (dest / "config.json").is_file():
        raise SystemExit(f"gpu-check: {source} has no config.json")
    return copied


def prepare(dest: Path = DEFAULT_DIR, python_version: str = IMAGE_PYTHON) -> None:
    from llm.smollm2 import prepare_smollm2

    wheels = download_wheels(dest / "wheels", python_version)
    copy_model_files(prepare_smollm2(), dest / "smollm2-135m")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 1e6:7.2f} MB  {wheel.name}")
    print(f"{dest}: {size / 2**20:.1f} MiB in all (the working tree travels in 64 MiB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_env", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download the carried wheels and SmolLM2's config")
    p.add_argument("--dest", type=Path, default=DEFAULT_DIR)
    p.add_argument("--python-version", default=IMAGE_PYTHON, help="the GPU image's Python")
    args = ap.parse_args(argv)
    prepare(args.dest, args.python_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
