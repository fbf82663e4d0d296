"""Running the real Snakemake workflow from tests, in a scratch working directory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def env() -> dict[str, str]:
    """The rules call `python -m ferflow...`: this interpreter first on PATH, the package importable."""
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def snakemake(workdir: Path, *args: str, configs=(CONFIG, TINY), snakefile: Path = REPO / "Snakefile",
              check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir),
           "--configfile", *map(str, configs), "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a run started with ``start_new_session=True``: its whole process group, then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
