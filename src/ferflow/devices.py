"""Which GPU a job uses: one free GPU per job, claimed with a lock the kernel releases on death.

Snakemake's ``resources: gpu=1`` only counts jobs; it never says which GPU a job should take. On
a workstation each training or prediction job therefore claims a GPU itself:

1. If ``CUDA_VISIBLE_DEVICES`` is already set to as many ids as the job needs (SLURM gives a job
   exactly its GPUs), it is used as it is. Set to more ids (a workstation shell that exports
   ``CUDA_VISIBLE_DEVICES=0,1``), those ids are the devices to claim among (step 3).
2. Else the GPUs are counted without initialising CUDA: ``FERFLOW_NUM_GPUS`` if set, else the
   lines of ``nvidia-smi -L`` (0 when nvidia-smi is absent or fails).
3. With 0 GPUs the job runs on the CPU. Else it takes exclusive, non-blocking ``flock`` s on
   ``<lock_dir>/gpu{id}.lock`` for the first free ids (all it needs or none) and sets
   ``CUDA_VISIBLE_DEVICES`` to them before anything starts CUDA. When too few are free it polls
   until enough free or ``timeout`` passes.

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


#: Lock descriptors of the claims now held in this process (for ``main``'s exec).
_HELD: list[int] = []


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


def _lock_name(device_id: str) -> str:
    """A lock file name for a device id (an index, or a UUID as ``GPU-...``/``MIG-...``)."""
    return "gpu" + "".join(c if c.isalnum() or c in "-_." else "_" for c in device_id) + ".lock"


def _try_claim(folder: Path, candidates: list[str], count: int) -> list[tuple[str, int]] | None:
    """``count`` of ``candidates`` locked (id, fd), or None (and nothing held) when fewer are free."""
    held: list[tuple[str, int]] = []
    for device_id in candidates:
        fd = _try_lock(folder / _lock_name(device_id))
        if fd is not None:
            held.append((device_id, fd))
            if len(held) == count:
                return held
    for _, fd in held:  # all or nothing: a job never sits on part of what it needs
        os.close(fd)
    return None


def _candidates(count: int, n_devices: int | None) -> tuple[list[str] | None, str]:
    """The device ids to claim among, or None to use ``CUDA_VISIBLE_DEVICES`` as it is."""
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is not None:
        ids = [x.strip() for x in preset.split(",") if x.strip()]
        if len(ids) <= count:  # what a scheduler gives a job (SLURM: exactly the GPUs asked for)
            if ids and len(ids) < count:
                raise ValueError(f"CUDA_VISIBLE_DEVICES={preset!r} lists {len(ids)} device(s); "
                                 f"this job needs {count}")
            return None, f"using CUDA_VISIBLE_DEVICES={preset!r} as set by the environment"
        # several ids exported by the user's shell: they are the devices to share, not one job's
        return ids, f"claiming {count} of the devices CUDA_VISIBLE_DEVICES={preset!r} lists"
    n = count_gpus() if n_devices is None else int(n_devices)
    return [str(i) for i in range(n)], f"claiming {count} of {n} GPUs"


@contextlib.contextmanager
def claim_device(
    lock_dir: str | os.PathLike | None = None,
    n_devices: int | None = None,
    timeout: float | None = 24 * 3600.0,
    poll: float = 1.0,
    count: int = 1,
) -> Iterator[str | None]:
    """Claim ``count`` GPUs for the duration of the ``with`` block; yields their ids, comma-joined.

    ``CUDA_VISIBLE_DEVICES`` set before with at most ``count`` ids (SLURM, or a user pinning one
    job) is yielded as it is, no lock taken (fewer than ``count`` ids: ``ValueError``). Set with
    more ids (a workstation shell exporting ``0,1``), the claim is among those ids and the
    variable is narrowed to the ones claimed. Unset: among the ``count_gpus()`` indexes (or
    ``n_devices``). Yields None when there is no GPU (run on the CPU). ``timeout`` (seconds, None =
    forever) bounds the wait when too few GPUs are free; then :class:`NoFreeDevice` is raised.
    The variable is restored when the block ends.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    candidates, how = _candidates(count, n_devices)
    if candidates is None:
        log.info(how)
        yield os.environ["CUDA_VISIBLE_DEVICES"]
        return
    if not candidates:
        log.info("no GPU found; running on the CPU")
        yield None
        return
    if count > len(candidates):
        raise ValueError(f"{count} GPUs asked for, {len(candidates)} on this machine ({how})")
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    waited = False
    while (held := _try_claim(folder, candidates, count)) is None:
        if timeout is not None and time.monotonic() - start >= timeout:
            raise NoFreeDevice(
                f"all {len(candidates)} GPUs are claimed (locks in {folder}); waited {timeout:.0f} s. "
                f"Set CUDA_VISIBLE_DEVICES to one id to override, or {ENV_NUM_GPUS} to change the count."
            )
        if not waited:
            log.info("%s: too few free; waiting (locks in %s)", how, folder)
            waited = True
        time.sleep(poll)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    claimed = ",".join(device_id for device_id, _ in held)
    os.environ["CUDA_VISIBLE_DEVICES"] = claimed
    log.info("claimed GPU%s %s of %d (%s; locks in %s)", "s" if count > 1 else "", claimed, len(candidates),
             how, folder)
    _HELD.extend(fd for _, fd in held)
    try:
        yield claimed
    finally:
        for _, fd in held:
            _HELD.remove(fd)
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
        for _, fd in held:
            os.close(fd)  # releases the flock


@contextlib.contextmanager
def select_device(choice: str = "auto", lock_dir: str | os.PathLike | None = None,
                  timeout: float | None = 24 * 3600.0):
    """A ``torch.device`` for ``choice`` (auto | cpu | cuda | cuda:N), claiming a GPU for auto.

    Under ``torchrun`` (``LOCAL_RANK`` set) nothing is claimed: the launcher's claim
    (``python -m ferflow.devices --gpus k -- torchrun ...``) narrowed ``CUDA_VISIBLE_DEVICES`` to
    the job's GPUs, and rank r takes ``cuda:LOCAL_RANK`` (the CPU when there is none).
    Raises RuntimeError when auto finds no GPU to claim (nvidia-smi missing or failing, no
    ``FERFLOW_NUM_GPUS``) although torch sees CUDA devices: training on the CPU then would be
    a silent mistake.
    """
    if choice == "auto" and os.environ.get("LOCAL_RANK") is not None:
        import torch

        rank = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
        log.info("device: %s (rank %d, CUDA_VISIBLE_DEVICES=%s)", device, rank,
                 os.environ.get("CUDA_VISIBLE_DEVICES"))
        yield device
        return
    if choice == "auto":
        with claim_device(lock_dir, timeout=timeout) as claimed:
            import torch

            if claimed is not None and torch.cuda.is_available():
                device = torch.device("cuda", 0)
                log.info("device: %s (%s, CUDA_VISIBLE_DEVICES=%s)", device,
                         torch.cuda.get_device_name(0), claimed)
            elif claimed is None and torch.cuda.is_available():
                raise RuntimeError(
                    f"torch sees {torch.cuda.device_count()} CUDA device(s) but no GPU could be counted "
                    f"for a claim (nvidia-smi missing or failing): set {ENV_NUM_GPUS} to the number of "
                    "GPUs (or CUDA_VISIBLE_DEVICES to one id), or pass --device cpu to train on the CPU")
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


def main(argv: list[str] | None = None) -> int:
    """``python -m ferflow.devices --gpus K -- COMMAND ...``: claim K GPUs, run COMMAND with
    ``CUDA_VISIBLE_DEVICES`` narrowed to them (the CPU when there is none), hold the claim until
    COMMAND ends. For multi-GPU training under ``torchrun``, whose ranks must share one claim."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ferflow.devices", description=main.__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=1, help="GPUs to claim (default 1)")
    p.add_argument("--lock-dir", default=None)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (python -m ferflow.devices --gpus K -- COMMAND ...)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with claim_device(args.lock_dir, count=args.gpus) as claimed:
        env = dict(os.environ)
        if claimed is None:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the ranks must not find a GPU the claim did not give
        # exec with the lock descriptors inherited: the locks live exactly as long as COMMAND
        for fd in _HELD:
            os.set_inheritable(fd, True)
        os.execvpe(command[0], command, env)
    return 0  # not reached

if __name__ == "__main__":
    import sys

    sys.exit(main())
