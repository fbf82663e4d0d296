"""A throw-away single-node SLURM cluster for tests: munged + slurmctld + slurmd, run as root.

Everything lives in one scratch folder (keys, sockets, state, logs, pid files); nothing under /etc
is touched. The node declares fake GPUs through gres (character devices made with ``mknod``, as
SLURM rejects plain files), so ``--gpus=1`` works and sets ``CUDA_VISIBLE_DEVICES`` in the job.

Clients find the cluster through ``SLURM_CONF``; :meth:`SlurmCluster.env` returns an environment
with it set and with a folder of wrappers first on ``PATH``:

- ``srun`` re-exports ``SLURM_CONF``: the SLURM executor plugin's job step removes every
  ``SLURM_*`` variable before its inner ``srun``, which then finds no configuration.
- ``sbatch`` appends its arguments, as one JSON list per line, to ``sbatch_calls.jsonl``, so tests
  can check what the executor asked for (``--gpus=1``, ``-p gpu``, ...).

See ``docs/test-cluster.md`` for what was checked on this kind of machine. Debian packages:
slurmctld slurmd slurm-client munge (installed in CI by ``.ci/system-deps``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "srun", "sinfo", "scontrol", "scancel")
PARTITIONS = ("cpu", "gpu")  # as named in profiles/slurm/config.yaml; cpu is the default


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if _which(b) is None]


def why_unusable() -> str | None:
    """Why no cluster can be started here (None when it can)."""
    missing = missing_binaries()
    if missing:
        return (f"SLURM/munge binaries missing: {', '.join(missing)} (Debian: apt-get install slurmctld "
                "slurmd slurm-client munge; CI does this in .ci/system-deps)")
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmd as root; not root here"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One node (this machine) with partitions ``cpu`` (default) and ``gpu``, and ``gpus`` fake GPUs.

    ``cpus`` and ``mem_mb`` are what the node declares; ``SlurmdParameters=config_overrides`` makes
    slurmd accept more than the machine has, so the workflow's real requests (4 CPUs, 16 GB for
    training) are schedulable on a small CI machine. Nothing is enforced (no cgroups).
    """

    def __init__(self, root: str | os.PathLike, cpus: int = 8, mem_mb: int = 64000, gpus: int = 2):
        self.root = Path(root)
        self.cpus, self.mem_mb, self.gpus = cpus, mem_mb, gpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        self.sbatch_log = self.root / "sbatch_calls.jsonl"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._started: list[tuple[str, Path]] = []  # (daemon, pid file), in start order

    # ---- configuration ------------------------------------------------------------------------
    def _write_files(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "bin", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        devices = []
        for i in range(self.gpus):
            dev = r / "dev" / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
            devices.append(dev)
        ctld_port, d_port = _free_port(), _free_port()
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text("\n".join([
            "ClusterName=ferflowtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=300",  # finished jobs stay visible to squeue for 5 minutes
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MailProg=/bin/true",
            "GresTypes=gpu",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb}{gres} State=UNKNOWN",
            f"PartitionName={PARTITIONS[0]} Nodes=ALL Default=YES MaxTime=INFINITE DefMemPerCPU=500 State=UP",
            f"PartitionName={PARTITIONS[1]} Nodes=ALL Default=NO MaxTime=INFINITE DefMemPerCPU=500 State=UP",
            "",
        ]))
        gres_lines = ["AutoDetect=off"]
        if self.gpus:
            files = devices[0] if self.gpus == 1 else f"{r / 'dev'}/fakegpu[0-{self.gpus - 1}]"
            gres_lines.append(f"NodeName={self.node} Name=gpu File={files}")
        (r / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        self._write_wrappers()

    def _write_wrappers(self) -> None:
        srun = self.bin / "srun"
        srun.write_text(f"#!/bin/sh\nexport SLURM_CONF={self.conf}\nexec {_which('srun')} \"$@\"\n")
        sbatch = self.bin / "sbatch"
        sbatch.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            f"with open({str(self.sbatch_log)!r}, 'a') as f:\n"
            "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
            f"os.environ['SLURM_CONF'] = {str(self.conf)!r}\n"
            f"os.execv({_which('sbatch')!r}, ['sbatch'] + sys.argv[1:])\n"
        )
        for w in (srun, sbatch):
            w.chmod(0o755)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        e["PATH"] = f"{self.bin}{os.pathsep}{e.get('PATH', '')}"
        for var in list(e):  # a test run inside a SLURM job must not leak its allocation
            if var.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_")):
                del e[var]
        return e

    # ---- lifecycle ----------------------------------------------------------------------------
    def _daemon(self, name: str, args: list[str], pid_file: Path) -> None:
        proc = subprocess.run([_which(name), *args], env=self.env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start ({proc.returncode}): {proc.stderr}{self.logs()}")
        self._started.append((name, pid_file))

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self._write_files()
        r = self.root
        self._daemon("munged", ["--force", f"--socket={self.munge_socket}", f"--key-file={r / 'munge' / 'munge.key'}",
                                f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                                f"--seed-file={r / 'munge' / 'munged.seed'}"], r / "munge" / "munged.pid")
        self._daemon("slurmctld", ["-c", "-f", str(self.conf)], r / "slurmctld.pid")
        self._daemon("slurmd", ["-f", str(self.conf), "-N", self.node], r / "slurmd.pid")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state and all(s == "idle" for s in state.split()):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"the node never became idle (sinfo: {state!r}){self.logs()}")

    def _pid(self, pid_file: Path) -> int | None:
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel every job, then stop the daemons in reverse order (by their pid files)."""
        if any(name == "slurmctld" for name, _ in self._started):
            subprocess.run(["scancel", "-u", "root"], env=self.env(), capture_output=True, timeout=30)
        for name, pid_file in reversed(self._started):
            pid = self._pid(pid_file)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._started.clear()

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- inspection ---------------------------------------------------------------------------
    def sbatch_calls(self) -> list[list[str]]:
        if not self.sbatch_log.exists():
            return []
        return [json.loads(line) for line in self.sbatch_log.read_text().splitlines() if line.strip()]

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"\n--- {f.name} ---\n" + "\n".join(lines))
        return "".join(out)
