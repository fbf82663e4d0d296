"""Run a Python module or script, then write the process's peak resident memory to a file.

    python bench/_peak.py -m ferflow.shards ARGS...     # as ``python -m ferflow.shards ARGS...``
    python bench/_peak.py SCRIPT.py ARGS...             # as ``python SCRIPT.py ARGS...``

With ``FERFLOW_PEAK_FILE`` set, the process's ``VmHWM`` (peak resident set size since it started
this program, from ``/proc/self/status``, in KiB) is written there when it exits, after the module
or script ran (normal end, ``sys.exit`` or an exception; not after ``os._exit`` or a signal).

Why not ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in the parent: Linux keeps, in a child's
``ru_maxrss``, the resident high-water mark of the memory it had before ``exec`` -- a copy of the
parent's (fork) or the parent's own (vfork). A bench that built gigabytes of input in its own process
before starting a stage therefore read the parent's size as the stage's peak. ``VmHWM`` belongs to
the memory map the program got at ``exec``, so it is the stage's own.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys


def vm_hwm_kib(status: str = "/proc/self/status") -> int:
    """``VmHWM`` of ``status`` in KiB (Linux); 0 when the line is absent."""
    with open(status) as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _write_peak() -> None:
    out = os.environ.get("FERFLOW_PEAK_FILE")
    if out:
        with open(out, "w") as fh:
            fh.write(f"{vm_hwm_kib()}\n")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: _peak.py -m MODULE [ARGS...] | _peak.py SCRIPT [ARGS...]")
    atexit.register(_write_peak)
    if sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = sys.argv[1]
        sys.argv = sys.argv[1:]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
