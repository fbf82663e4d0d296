"""Benchmark of the training loader (``ferflow.data.make_loader``) against folder-of-JPEGs loaders
and against plain JPEG decoding, on the same 224x224 JPEGs and with the same worker count.

The sides, timed in alternating rounds (``bench/_abba.py``: the order ferflow, folder,
torchvision, decode, decode, torchvision, folder, ferflow; the median of the per-round ratios
with its range; the load average is printed first):

- ``ferflow``: our training stream (WebDataset shards -> decode -> augmentations -> uint8 batches in
  reused shared-memory slots), augmentation on (``--augment``, default the paper's flip + crop +
  color), no bootstrap; it borrows each batch's slot until the next batch, as the training loop does;
- ``folder`` (the headline's baseline): one JPEG file per sample read by a map-style ``Dataset``,
  **the same augmentation code** (``ferflow.augment.build_transform``: OpenCV decode, the same crop,
  flip and colour matrix), torch's default collate, a shuffling ``DataLoader`` with the same batch
  size and workers. Equal work per sample, so the ratio measures the loading design (shards and
  slots against files and collate);
- ``torchvision``: what one writes with torchvision's standard transforms: ``ImageFolder`` (PIL
  decoding) and DAN's v2 transforms for the same augmentations (``RandomCrop(size, padding)``,
  ``RandomHorizontalFlip``, ``RandomApply([ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8)``, whose hue
  step goes through HSV), ``PILToTensor``; the second line;
- ``decode``: the limit: the same JPEG bytes, already in memory, only decoded (no augmentation, no
  batching), by the same number of processes, with the fastest decoder at hand (torchvision's
  libjpeg-turbo ``decode_jpeg``, OpenCV and PIL are timed once on a few hundred images before the
  rounds; the fastest is the limit).

Each side's time is for the same samples: from the first batch to the last (worker start-up
excluded), scaled to all ``--n`` samples. Goals: ``ferflow`` at least as fast as ``folder`` and at
least 0.7x ``decode``.

    python bench/loader.py                           # 2000 images, 2 workers, 5 rounds
    python bench/loader.py --n 20000 --workers 8      # a machine with more cores
    python bench/loader.py --n 256 --rounds 1         # smoke mode (tests)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abba import load_line, ratio_line, ratios, run_rounds  # noqa: E402

from ferflow import data, schemas  # noqa: E402
from ferflow.augment import AFFINE, COLOR_JITTER, CROP_PADDING, ERASE, build_transform  # noqa: E402

SIZE = 224


# ------------------------------------------------------------------------------------------------
# the same JPEGs, as shards and as a folder


def face_like(rng: np.random.Generator) -> np.ndarray:
    """A smooth 224x224 image with a face-sized ellipse: compresses like a face crop (~12 kB at quality 90)."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    gy, gx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for c in range(3):
        img[:, :, c] = rng.uniform(40, 200) + rng.uniform(-60, 60) * gx + rng.uniform(-60, 60) * gy
    centre = (int(rng.integers(90, 134)), int(rng.integers(90, 134)))
    cv2.ellipse(img, centre, (int(rng.integers(50, 70)), int(rng.integers(65, 90))), 0, 0, 360,
                tuple(float(x) for x in rng.uniform(80, 230, 3)), -1)
    for _ in range(6):  # eyes, mouth, shadows
        cv2.circle(img, (int(rng.integers(60, 164)), int(rng.integers(60, 164))), int(rng.integers(4, 14)),
                   tuple(float(x) for x in rng.uniform(0, 120, 3)), -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.2)
    img += rng.normal(0, 12, img.shape)  # skin texture, hair, sensor noise
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_data(root: Path, n: int, per_shard: int, seed: int = 0) -> list[bytes]:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(n):
        ok, buf = cv2.imencode(".jpg", face_like(rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        jpegs.append(buf.tobytes())
    rows = []
    (root / "shards" / "train").mkdir(parents=True)
    for s in range(0, n, per_shard):
        shard = f"train/shard-{s // per_shard:05d}.tar"
        with wds.TarWriter(str(root / "shards" / shard)) as sink:
            for i in range(s, min(n, s + per_shard)):
                key = f"train/bench/v{i % 50:02d}/{i:06d}"
                sink.write({"__key__": key, "jpg": jpegs[i]})
                rows.append({"key": key, "split": "train", "source": "bench", "video": f"v{i % 50:02d}", "frame": i,
                             "expression": i % 8, "valence": 0.0, "arousal": 0.0, "shard": shard,
                             "still": False})
    schemas.write_table(pl.DataFrame(rows), root / "shards" / "labels.parquet", schemas.LABELS)
    for i, jpg in enumerate(jpegs):
        d = root / "folder" / f"class{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(jpg)
    return jpegs


# ------------------------------------------------------------------------------------------------
# the three measurements


def seconds_for_all(batches, n_expected: int) -> float:
    """Seconds from the first batch to the last, scaled to ``n_expected`` samples (start-up excluded);
    checks that every sample came."""
    it = iter(batches)
    first = next(it)
    size = (lambda b: len(b[0]) if isinstance(b, (list, tuple)) else len(b["key"]))
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += size(b)
    dt = time.perf_counter() - t0
    assert n + size(first) == n_expected, (n + size(first), n_expected)
    return dt / max(n, 1) * n_expected


def ours(root: Path, args) -> float:
    loader, _ = data.make_loader(root / "shards", "train", batch_size=args.batch_size, input_size=args.input_size,
                                 train=True, augment=args.augment, seed=1, bootstrap=False, workers=args.workers,
                                 borrow=True)  # as the training loop reads it
    return seconds_for_all(loader, args.n)


class FolderSameAugment(torch.utils.data.Dataset):
    """One JPEG file per sample, ferflow's own per-sample transform (same decoder, same augmentations)."""

    def __init__(self, folder: Path, input_size: int, augment: list[str], seed: int = 1):
        self.files = sorted(folder.rglob("*.jpg"))
        self.labels = [int(f.parent.name.removeprefix("class")) for f in self.files]
        self.transform = build_transform(input_size, augment)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        rng = random.Random(hash((self.seed, self.epoch, i)))
        img = self.transform(self.files[i].read_bytes(), rng)  # RGB HWC uint8
        return torch.from_numpy(img).permute(2, 0, 1), self.labels[i]


def folder(root: Path, args) -> float:
    from torch.utils.data import DataLoader

    ds = FolderSameAugment(root / "folder", args.input_size, args.augment)
    kw = {"prefetch_factor": 4} if args.workers else {}
    return seconds_for_all(DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, **kw), args.n)


def torchvision_transform(input_size: int, augment: list[str]):
    """DAN's torchvision transforms for ``augment`` (v2 on the PIL image, uint8 out)."""
    from torchvision.transforms import v2

    steps = [v2.Resize((input_size, input_size), antialias=True)]
    if "crop" in augment:
        steps.append(v2.RandomCrop(input_size, padding=round(input_size * CROP_PADDING)))
    if "flip" in augment:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if "color" in augment:
        cj = COLOR_JITTER
        steps.append(v2.RandomApply([v2.ColorJitter(cj["brightness"], cj["contrast"], cj["saturation"], cj["hue"])],
                                    p=cj["p"]))
    if "affine" in augment:
        a = AFFINE
        steps.append(v2.RandomApply([v2.RandomAffine(a["degrees"], translate=(a["translate"],) * 2, scale=a["scale"])],
                                    p=a["p"]))
    steps.append(v2.PILToTensor())
    if "erase" in augment:
        steps.append(v2.RandomErasing(p=ERASE["p"], scale=ERASE["scale"], ratio=ERASE["ratio"], value=0))
    return v2.Compose(steps)


def torchvision_folder(root: Path, args) -> float:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "folder"), transform=torchvision_transform(args.input_size, args.augment))
    kw = {"prefetch_factor": 4} if args.workers else {}
    return seconds_for_all(DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, **kw), args.n)


def _decode_share(job) -> tuple[float, float]:
    jpegs, decoder = job
    torch.set_num_threads(1)
    fn = DECODERS[decoder]
    fn(jpegs[0])
    t0 = time.perf_counter()
    for b in jpegs:
        fn(b)
    return t0, time.perf_counter()


def _tv(b: bytes):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _cv(b: bytes):
    return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)


def _pil(b: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(b)) as im:
        return np.asarray(im.convert("RGB"))


DECODERS = {"torchvision": _tv, "opencv": _cv, "pil": _pil}


def decode(jpegs: list[bytes], workers: int, decoder: str) -> float:
    """Seconds for ``workers`` processes (1 when 0) each decoding its share of ``jpegs``."""
    procs = max(1, workers)
    shares = [(jpegs[i::procs], decoder) for i in range(procs)]
    if procs == 1:
        spans = [_decode_share(shares[0])]
    else:
        with mp.get_context("fork").Pool(procs) as pool:
            spans = pool.map(_decode_share, shares)
    return max(e for _, e in spans) - min(s for s, _ in spans)


def fastest_decoder(jpegs: list[bytes]) -> tuple[str, dict[str, float]]:
    """The decoder with the most images/s on (up to) 300 images, one process, best of 3 (untimed elsewhere)."""
    sample = jpegs[:300]
    rates = {d: len(sample) / min(decode(sample, 1, d) for _ in range(3)) for d in DECODERS}
    return max(rates, key=rates.get), rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    p.add_argument("--workers", type=int, default=2, help="loader workers = decoding processes (default 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=SIZE, help="model input side (default 224: no resize)")
    p.add_argument("--augment", nargs="*", default=["flip", "crop", "color"],
                   help="augmentations (default: the paper's flip crop color)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (the config default)")
    p.add_argument("--rounds", type=int, default=5, help="ABBA rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1)")
    p.add_argument("--dir", help="folder for the data (default: a temporary one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(load_line(), flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        jpegs = make_data(root, args.n, args.per_shard)
        mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
        best, rates = fastest_decoder(jpegs)
        print(f"{args.n} JPEGs {SIZE}x{SIZE} ({mean_kb:.1f} kB mean) written in {time.perf_counter() - t:.1f} s; "
              f"workers {args.workers}, batch {args.batch_size}, input {args.input_size}, augment {args.augment}; "
              f"decoders, images/s on one process: "
              + ", ".join(f"{d} {r:.0f}" for d, r in rates.items()) + f" -> limit: {best}", flush=True)
        sides = {"ferflow": lambda: ours(root, args), "folder": lambda: folder(root, args),
                 "torchvision": lambda: torchvision_folder(root, args),
                 "decode": lambda: decode(jpegs, args.workers, best)}
        print(f"seconds for the {args.n} samples, per round (two runs each):", flush=True)
        per_round = run_rounds(sides, args.rounds)
    r_folder = ratios(per_round, "folder", "ferflow")
    r_limit = ratios(per_round, "decode", "ferflow")
    print(ratio_line("RATIO ferflow / folder loader with the same augmentations (samples/s)", r_folder,
                     goal="goal >= 1.0"))
    print(ratio_line("      ferflow / torchvision ImageFolder + DAN's standard transforms", ratios(per_round, "torchvision", "ferflow")))
    print(ratio_line(f"      ferflow / decode limit ({best}, decoding only)", r_limit, goal="goal >= 0.7"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
