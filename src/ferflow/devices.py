"""Which GPU a job uses: one free GPU per job, claimed with a lock the kernel releases on death.

Snakemake's ``resources: gpu=1`` only counts jobs; it never says which GPU a job should take. On
a workstation each training or prediction job therefore claims a GPU itself:

1. If ``CUDA_VISIBLE_DEVICES`` is already set (SLURM, or the user), it is used as it is.
2. Else the GPUs are counted without initialising CUDA: ``FERFLOW_NUM_GPUS`` if set, else the
   lines of ``nvidia-smi -L`` (0 when nvidia-smi is absent or fails).
3. With 0 GPUs the job runs on the CPU. Else it takes an exclusive, non-blocking ``flock`` on
   ``<lock_dir>/gpu{i}.lock`` for the first free i and sets ``CUDA_VISIBLE_DEVICES=i`` before
   anything starts CUDA. When every GPU is taken it polls until one frees or ``timeout`` passes.

The lock lives as long as the open file descriptor: the kernel drops it when the process exits,
however it exits (SIGKILL included), so a crashed job never leaves a GPU claimed.

This module imports torch only inside :func:`select_device`, after the claim.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

ENV_NUM_GPUS = "FERFLOW_NUM_GPUS"
ENV_LOCK_DIR = "FERFLOW_GPU_LOCK_DIR"


class NoFreeDevice(TimeoutError):
    pass


def default_lock_dir() -> Path:
    """``$FERFLOW_GPU_LOCK_DIR``, else a per-machine folder under the temp dir (one per user)."""
    env = os.environ.get(ENV_LOCK_DIR)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"ferflow-gpu-locks-{os.getuid()}"


def count_gpus() -> int:
    """GPUs on this machine, without initialising CUDA."""
    env = os.environ.get(ENV_NUM_GPUS)
    if env not in (None, ""):
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{ENV_NUM_GPUS}={env!r} is not an integer") from None
        if n < 0:
            raise ValueError(f"{ENV_NUM_GPUS}={env!r} must be >= 0")
        return n
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        res = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    if res.returncode != 0:
        return 0
    return sum(1 for line in res.stdout.splitlines() if line.strip().startswith("GPU "))


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    # who holds it, for people looking at the folder (the lock itself is the flock, not this text)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def claim_device(
    lock_dir: str | os.PathLike | None = None,
    n_devices: int | None = None,
    timeout: float | None = 24 * 3600.0,
    poll: float = 1.0,
) -> Iterator[str | None]:
    """Claim one GPU for the duration of the ``with`` block; yields its index as a string.

    Yields the existing ``CUDA_VISIBLE_DEVICES`` when it was set before (no lock taken), and None
    when there is no GPU (run on the CPU). ``timeout`` (seconds, None = forever) bounds the wait
    when every GPU is claimed; then :class:`NoFreeDevice` is raised.
    """
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is not None:
        log.info("using CUDA_VISIBLE_DEVICES=%r as set by the environment", preset)
        yield preset
        return
    n = count_gpus() if n_devices is None else int(n_devices)
    if n <= 0:
        log.info("no GPU found; running on the CPU")
        yield None
        return
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    waited = False
    while True:
        for i in range(n):
            fd = _try_lock(folder / f"gpu{i}.lock")
            if fd is not None:
                break
        else:
            fd = None
        if fd is not None:
            break
        if timeout is not None and time.monotonic() - start >= timeout:
            raise NoFreeDevice(
                f"all {n} GPUs are claimed (locks in {folder}); waited {timeout:.0f} s. "
                f"Set CUDA_VISIBLE_DEVICES to override, or {ENV_NUM_GPUS} to change the count."
            )
        if not waited:
            log.info("all %d GPUs are claimed; waiting for one to free (locks in %s)", n, folder)
            waited = True
        time.sleep(poll)
    os.environ["CUDA_VISIBLE_DEVICES"] = str(i)
    log.info("claimed GPU %d of %d (lock %s)", i, n, folder / f"gpu{i}.lock")
    try:
        yield str(i)
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def select_device(choice: str = "auto", lock_dir: str | os.PathLike | None = None,
                  timeout: float | None = 24 * 3600.0):
    """A ``torch.device`` for ``choice`` (auto | cpu | cuda | cuda:N), claiming a GPU for auto."""
    if choice == "auto":
        with claim_device(lock_dir, timeout=timeout) as claimed:
            import torch

            if claimed is not None and torch.cuda.is_available():
                device = torch.device("cuda", 0)
                log.info("device: %s (%s, CUDA_VISIBLE_DEVICES=%s)", device,
                         torch.cuda.get_device_name(0), claimed)
            else:
                device = torch.device("cpu")
                log.info("device: cpu")
            yield device
        return
    import torch

    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {choice}: CUDA is not available on this machine")
    log.info("device: %s", device)
    yield device
