"""OpenMP parallel regions per training step: DAN (heads fused and one by one) and the plain ResNet.

On a loaded machine each parallel region of a multi-threaded CPU step waits until all its threads
are scheduled, so ``bench/train_step.py``'s time ratio at 2 threads follows the number of regions
as much as the FLOPs. This counts them: a small C shim, compiled here with ``cc`` and loaded with
``LD_PRELOAD``, wraps libgomp's ``GOMP_parallel`` (the entry point of every ``#pragma omp
parallel`` in PyTorch's CPU kernels and oneDNN) with a counter; a ``TorchDispatchMode`` gives the
count per ATen op. Same steps as ``bench/train_step.py`` (ResNet-18, 112 px, batch 16 by default).
Counts, not times: no rounds, and the load does not change them. Linux with PyTorch's libgomp only.

    python bench/omp_regions.py                   # --threads 2 --batch-size 16 --size 112
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
typedef void (*fn_t)(void (*)(void *), void *, unsigned, unsigned);
static fn_t real;
static long count;
long omp_regions_count(void) { return count; }
void GOMP_parallel(void (*f)(void *), void *data, unsigned n, unsigned flags) {
    if (!real) real = (fn_t)dlvsym(RTLD_NEXT, "GOMP_parallel", "GOMP_4.0");
    __atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
    real(f, data, n, flags);
}
"""
# libtorch imports the versioned symbol GOMP_parallel@GOMP_4.0: the shim must export that version
VERSIONS = "GOMP_4.0 { global: GOMP_parallel; };\nSHIM { global: omp_regions_count; };\n"


def build_shim(folder: Path) -> Path:
    (folder / "shim.c").write_text(SHIM)
    (folder / "shim.map").write_text(VERSIONS)
    lib = folder / "libompregions.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", f"-Wl,--version-script={folder / 'shim.map'}",
                    "-o", str(lib), str(folder / "shim.c"), "-ldl"], check=True)
    return lib


def count(args) -> int:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_step as ts

    lib = ctypes.CDLL(os.environ["OMP_REGIONS_SHIM"])
    lib.omp_regions_count.restype = ctypes.c_long
    torch.set_num_threads(args.threads)

    class PerOp(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.regions = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = lib.omp_regions_count()
            out = func(*args, **(kwargs or {}))
            if lib.omp_regions_count() > before:
                self.regions[str(func.overloadpacket)] += lib.omp_regions_count() - before
            return out

    g = torch.Generator().manual_seed(0)
    bs, size = args.batch_size, args.size
    batch = {"image": torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, generator=g),
             "expr": torch.randint(0, 8, (bs,), generator=g), "va": torch.rand(bs, 2, generator=g) * 2 - 1}
    torch.manual_seed(0)
    steps = {"DAN, heads fused": ts.dan_step_fn(args.backbone, batch),
             "DAN, heads one by one": ts.dan_step_fn(args.backbone, batch, fuse_heads=False),
             "plain": ts.plain_step_fn(args.backbone, batch)}
    print(ts.load_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.backbone}, {size} px, batch {bs}")
    totals = {}
    for name, (step, _, _) in steps.items():
        step()  # first step: one-off set-up
        start = lib.omp_regions_count()
        step()
        totals[name] = lib.omp_regions_count() - start
        with PerOp() as per_op:
            step()
        top = ", ".join(f"{op} {n}" for op, n in per_op.regions.most_common(6))
        print(f"{name}: {totals[name]} parallel regions per training step ({top})")
    if totals["plain"] == 0:
        print("no parallel region counted: this PyTorch does not call libgomp's GOMP_parallel", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if "OMP_REGIONS_SHIM" in os.environ:
        return count(args)
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_shim(Path(tmp))
        env = {**os.environ, "OMP_REGIONS_SHIM": str(lib), "LD_PRELOAD": str(lib)}
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
