"""A real conda for the tests and the builder benchmark.

No conda, mamba or micromamba can be installed from the registries these machines
reach, so ``../shared/conda/`` holds wheels of conda 26.7.1 and menuinst 2.5.2 built
from the upstream sources. They are installed (with ``conda-rattler-solver``, as conda's
default libmamba solver is not obtainable here) into a virtualenv of its own under the
repository's ``.cache/``, keyed by the wheels' hashes so warm runs reuse it. Where the
wheels are absent (a user's own clone), a ``conda`` on PATH is used instead; with
neither, ``find_real_conda`` says why, and the tests that need conda skip with that
reason. mamba and micromamba cannot be had here in any form.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HYPHA_CONDA_TEST_CACHE", REPO / ".cache"))
WHEELS_DIR = Path(os.environ.get("HYPHA_CONDA_TEST_WHEELS") or REPO.parent / "shared" / "conda")
WHEELS = ("menuinst-2.5.2-py3-none-any.whl", "conda-26.7.1-py3-none-any.whl")
SOLVER = "conda-rattler-solver==0.2.0"
READY = "hypha-conda-test-ready"


@dataclass(frozen=True)
class RealConda:
    """A conda that really runs: how to call it, and where it came from."""

    entry_point: Path  # the ``conda`` script or binary as installed
    command: tuple[str, ...]  # how to run every conda command with it
    origin: str
    rattler_solver: bool  # our venv: conda's default solver (libmamba) is missing
    install_seconds: float | None  # None when an earlier run's install was reused


def find_real_conda() -> RealConda | str:
    """The conda to test with, or the reason there is none."""
    if all((WHEELS_DIR / name).is_file() for name in WHEELS):
        return _venv_conda()
    system = shutil.which("conda")
    if system:
        return RealConda(Path(system), (system,), f"{system} (PATH)", False, None)
    return (
        f"no conda to test with: the conda wheels are not in {WHEELS_DIR} (set "
        "HYPHA_CONDA_TEST_WHEELS to their folder) and no conda is on PATH"
    )


def _venv_conda() -> RealConda:
    digest = hashlib.sha256()
    for name in WHEELS:
        digest.update(hashlib.sha256((WHEELS_DIR / name).read_bytes()).digest())
    digest.update(f"{SOLVER} {sys.version_info[:2]}".encode())
    venv = CACHE / f"conda-venv-{digest.hexdigest()[:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    seconds: float | None = None
    # Several pytest processes may want it at once: one installs, the others wait.
    with open(CACHE / f"{venv.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / READY).exists():
            started = time.monotonic()
            shutil.rmtree(venv, ignore_errors=True)
            _install(venv)
            (venv / READY).write_text(f"{time.monotonic() - started:.1f}\n")
            seconds = time.monotonic() - started
    python = venv / "bin" / "python"
    return RealConda(
        venv / "bin" / "conda",
        (str(python), "-m", "conda"),
        f"conda 26.7.1 from {WHEELS_DIR} in {venv}",
        True,
        seconds,
    )


def _install(venv: Path) -> None:
    wheels = [str(WHEELS_DIR / name) for name in WHEELS]
    uv = Path(sys.executable).parent / "uv"
    if uv.exists():  # scripts/test.sh installs uv: about twice as fast as pip here
        subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        install = [str(uv), "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*install, *wheels, SOLVER], check=True, timeout=600)


def conda_home(root: Path, conda: RealConda, *, pkgs_dir: Path | None = None) -> dict[str, str]:
    """A HOME, CONDARC and package cache of conda's own under ``root``.

    conda writes ``~/.conda/environments.txt`` and ``~/.cache/conda`` on every create:
    with its own HOME the tests never touch the real one.
    """
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    pkgs = pkgs_dir or root / "pkgs"
    lines = [
        f"pkgs_dirs: [{pkgs}]",
        "notify_outdated_conda: false",
        "report_errors: false",
    ]
    if conda.rattler_solver:
        lines.append("solver: rattler")
    condarc = root / "condarc"
    condarc.write_text("\n".join(lines) + "\n")
    return {"HOME": str(home), "CONDARC": str(condarc), "XDG_CACHE_HOME": str(home / ".cache")}


def tool_folder(
    root: Path,
    conda: RealConda,
    *,
    crashing_mamba: bool = False,
    env_probe: Path | None = None,
) -> Path:
    """A folder to put on PATH holding ``conda`` (and, as an injected fault, a ``mamba``
    that leaves a half-built prefix behind and crashes).

    ``conda`` is a link to the script as installed (for our venv, pip's entry point that
    refuses most commands: the worker must cope with it). With ``env_probe``, it is a
    wrapper that writes the environment the worker gave it to that file, then runs conda.
    """
    folder = root / "tools"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    conda_path = folder / "conda"
    if env_probe is None:
        conda_path.symlink_to(conda.entry_point)
    else:
        run = " ".join(f"'{part}'" for part in conda.command)
        conda_path.write_text(f"#!/bin/sh\nenv > '{env_probe}'\nexec {run} \"$@\"\n")
        conda_path.chmod(0o755)
    if crashing_mamba:
        mamba = folder / "mamba"
        # Fault injected by the test: a mamba that starts the environment (a file in the
        # prefix it was given), then crashes, on every call.
        mamba.write_text(
            "#!/bin/sh\n"
            'while [ $# -gt 0 ]; do [ "$1" = --prefix ] && mkdir -p "$2" && '
            'echo crashed > "$2/half-built-by-mamba"; shift; done\n'
            "kill -SEGV $$\n"
        )
        mamba.chmod(0o755)
    return folder


def conda_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            if marker.encode() in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids
