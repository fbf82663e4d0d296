"""The training loader: shards, labels, bootstrap, frame_step, determinism, resume, tar checks.

``write_synthetic_shards`` is also used by test_train.py and test_predict.py: it writes tiny shards
in the layout of ``ferflow.shards`` (WebDataset tars of ``{key}.jpg`` + labels.parquet) holding a
learnable task: the expression class is the colour of the image border, valence the grey level of
the upper half of the interior, arousal that of the lower half (all invariant to horizontal flips).
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
import torch
import webdataset as wds

from ferflow import augment, data, schemas, shardio

CLASS_COLOURS = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
     [255, 255, 255]], dtype=np.float32)


def synthetic_image(cls: int, valence: float, arousal: float, size: int, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((size, size, 3), np.float32)
    img[:] = CLASS_COLOURS[cls]
    b = size // 4
    mid = size // 2
    img[b:mid, b:size - b] = 128 + 110 * valence
    img[mid:size - b, b:size - b] = 128 + 110 * arousal
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_shards(
    root: Path,
    splits: dict[str, int],
    *,
    per_shard: int = 16,
    size: int = 48,
    videos: int = 3,
    seed: int = 0,
    missing: bool = True,
) -> pl.DataFrame:
    """Write ``<root>/<split>/shard-*.tar`` and ``<root>/labels.parquet``; returns the labels.

    ``splits``: samples per split. Samples are spread over ``videos`` videos per split (names with a
    dot, as allowed in keys) and shuffled across shards. With ``missing`` some samples lack the
    expression label and some the VA labels.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in splits.items():
        recs = []
        for i in range(n):
            video = f"clip.{i % videos}_left"
            frame = i // videos
            cls = int(rng.integers(0, 8))
            v, a = (float(x) for x in rng.uniform(-0.9, 0.9, 2))
            img = synthetic_image(cls, v, a, size, rng)
            expr = None if (missing and i % 11 == 5) else cls
            va = (None, None) if (missing and i % 13 == 7) else (v, a)
            key = f"{split}/synth/{video}/{frame:06d}"
            recs.append((key, split, video, frame, expr, va, img))
        order = rng.permutation(len(recs))
        recs = [recs[j] for j in order]
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in range(0, len(recs), per_shard):
            shard = f"{split}/shard-{s // per_shard:05d}.tar"
            with wds.TarWriter(str(root / shard)) as sink:
                for key, split_, video, frame, expr, va, img in recs[s:s + per_shard]:
                    ok, jpg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                    assert ok
                    sink.write({"__key__": key, "jpg": jpg.tobytes()})
                    rows.append({"key": key, "split": split_, "source": "synth", "video": video,
                                 "frame": frame, "expression": expr, "valence": va[0], "arousal": va[1],
                                 "shard": shard, "still": False})
    labels = pl.DataFrame(rows, schema_overrides={"expression": pl.Int8, "valence": pl.Float32,
                                                  "arousal": pl.Float32})
    schemas.write_table(labels, root / "labels.parquet", schemas.LABELS)
    return schemas.read_table(root / "labels.parquet", schemas.LABELS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, {"train": 60, "validation": 20})
    return root


def collect(loader) -> list[dict]:
    return [b for b in loader]


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# --------------------------------------------------------------------------------------------


def test_bootstrap_count_is_poisson_and_deterministic():
    keys = [f"train/s/v{i % 50}/{i:06d}" for i in range(20000)]
    counts = np.array([data.bootstrap_count(k, 7) for k in keys])
    assert abs(counts.mean() - 1.0) < 0.03
    assert abs(counts.var() - 1.0) < 0.06
    assert abs((counts == 0).mean() - np.exp(-1)) < 0.015
    again = np.array([data.bootstrap_count(k, 7) for k in keys])
    assert np.array_equal(counts, again)
    other = np.array([data.bootstrap_count(k, 8) for k in keys])
    assert not np.array_equal(counts, other)


def _index_labels(n: int = 3000, seed: int = 5) -> pl.DataFrame:
    """LABELS-like rows of two splits: keys of different lengths (shared prefixes, non-ASCII, one
    key a prefix of another), in no particular order."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        split = "validation" if i % 4 == 3 else "train"
        source = ("affwild2", "affectnet", "ß")[i % 3]
        video = f"v{int(rng.integers(0, 40))}" + ("_left" if i % 7 == 0 else "é" * int(rng.integers(0, 3)))
        key = f"{split}/{source}/{video}/{i:06d}" + ("x" * int(rng.integers(0, 30)) if i % 5 == 0 else "")
        rows.append({"key": key, "split": split, "source": source, "video": video, "frame": i,
                     "expression": None if i % 9 == 0 else i % 8, "valence": 0.001 * i, "arousal": -0.001 * i,
                     "shard": f"{split}/shard-{int(rng.integers(0, 25)):06d}.tar"})
    rows.append({**rows[0], "key": rows[0]["key"][:-2], "frame": n})  # a prefix of another key
    rows = [rows[j] for j in rng.permutation(len(rows))]
    return pl.DataFrame(rows, schema_overrides={"expression": pl.Int8, "valence": pl.Float32, "arousal": pl.Float32})


def test_label_index_finds_every_key_and_decodes_its_codes():
    labels = _index_labels()
    train = labels.filter(pl.col("split") == "train")
    index = data.label_index(labels, "train")
    truth = {k: i for i, k in enumerate(train["key"].to_list())}  # the old index: a dict
    assert len(index) == train.height == len(truth)
    for key, row in truth.items():
        assert index.lookup(key, "train/shard-000000.tar") == row
    keys = train["key"].to_list()[::-1]
    assert index.rows_of(keys).tolist() == [truth[k] for k in keys]
    assert index.frame.tolist() == train["frame"].to_list()
    assert index.expr.tolist() == [-1 if e is None else e for e in train["expression"].to_list()]
    for name in ("source", "video", "shard"):
        codes = getattr(index, f"{name}_code")
        assert codes.dtype == np.int32
        assert len(getattr(index, f"{name}_names")) == train[name].n_unique()
        decode = getattr(index, f"{name}_of")
        assert [decode(r) for r in range(train.height)] == train[name].to_list()


def test_label_index_unknown_key_names_shard_and_key():
    labels = _index_labels()
    index = data.label_index(labels, "train")
    train_keys = labels.filter(pl.col("split") == "train")["key"].to_list()
    other_split = labels.filter(pl.col("split") == "validation")["key"][0]
    longest = max(train_keys, key=len)
    for key in (other_split, longest + "0", longest[:-1] + "\0", longest + "\0", "", "~after/all",
                "!before/all", train_keys[0] + "\0"):
        assert key not in train_keys
        with pytest.raises(KeyError) as err:
            index.lookup(key, "train/shard-000003.tar")
        assert err.value.args[0] == f"train/shard-000003.tar: sample {key!r} has no row in labels.parquet"
    with pytest.raises(KeyError, match="labels.parquet"):
        index.rows_of([train_keys[0], other_split])


def test_label_index_rejects_duplicate_keys():
    labels = _index_labels(200)
    train = labels.filter(pl.col("split") == "train")
    doubled = pl.concat([labels, train.slice(5, 1).with_columns(pl.lit(99999, pl.Int64).alias("frame"))])
    with pytest.raises(ValueError, match="^labels.parquet: duplicate keys$"):
        data.label_index(doubled, "train")
    # the same key in two splits is no duplicate within a split
    moved = train.slice(5, 1).with_columns(pl.lit("validation").alias("split"))
    assert len(data.label_index(pl.concat([labels, moved]), "validation")) == labels.height - train.height + 1


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_fixed_width_bytes_keeps_each_string(chunk):
    values = ["b", "ab", "é", "", "zzzz", "a", "日本/x"] * 5
    s = pl.Series(values)
    assert [v.decode("utf-8") for v in data.fixed_width_bytes(s, chunk=chunk)] == values
    order = np.random.default_rng(chunk).permutation(len(values))
    got = data.fixed_width_bytes(s, order, chunk=chunk)
    assert got.dtype == np.dtype(f"S{max(len(v.encode()) for v in values)}")
    assert [v.decode("utf-8") for v in got] == [values[i] for i in order]
    with pytest.raises(ValueError, match="1 null values"):
        data.fixed_width_bytes(pl.Series(["a", None]), chunk=chunk)
    with pytest.raises(ValueError, match="NUL byte"):
        data.fixed_width_bytes(pl.Series(["a", "b\0"]), chunk=chunk)


def test_bootstrap_counts_equal_bootstrap_count():
    keys = [f"train/s/v{i % 50}/{i:06d}" for i in range(5000)] + ["é", "", "train/ß/x" * 9]
    for seed in (0, 7, 123456789):
        expected = [data.bootstrap_count(k, seed) for k in keys]
        assert data.bootstrap_counts(keys, seed).tolist() == expected
        assert data.bootstrap_counts([k.encode() for k in keys], seed).tolist() == expected


@pytest.mark.parametrize("bootstrap", [False, True])
def test_samples_per_worker_counts_kept_rows_and_repeats_per_shard(shards, bootstrap):
    labels = data.read_labels(shards).filter(pl.col("split") == "train")
    _, stream = data.make_loader(shards, "train", batch_size=8, input_size=32, train=True, seed=11,
                                 bootstrap=bootstrap, frame_step=2)
    stream.workers = 3  # sizes only: which shards each logical worker reads (no DataLoader started)
    # kept: every second frame of each video in frame order (first included), counted independently
    rank = {}
    for video, frames in labels.group_by("video").agg(pl.col("frame").sort()).iter_rows():
        rank.update({(video, f): i for i, f in enumerate(frames)})
    per_shard = Counter()
    for key, video, frame, shard in labels.select("key", "video", "frame", "shard").iter_rows():
        if rank[(video, frame)] % 2 == 0:
            per_shard[shard] += data.bootstrap_count(key, 11) if bootstrap else 1
    expected = [sum(per_shard[f"{p.parent.name}/{p.name}"] for p in stream.worker_shards(w)) for w in range(3)]
    assert stream.samples_per_worker() == expected
    assert sum(expected) < labels.height * (2 if bootstrap else 1)  # frame_step 2 dropped some


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_reads_every_sample_with_labels(shards, workers):
    labels = data.read_labels(shards)
    loader, stream = data.make_loader(shards, "validation", batch_size=8, input_size=32, train=False,
                                      workers=workers)
    batches = collect(loader)
    keys = keys_of(batches)
    val = labels.filter(pl.col("split") == "validation")
    assert sorted(keys) == sorted(val["key"].to_list())
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 32, 32)
    assert b["expr"].dtype == torch.int64 and b["va"].dtype == torch.float32 and b["va"].shape[1] == 2
    truth = {r["key"]: r for r in val.iter_rows(named=True)}
    for batch in batches:
        for k, e, va in zip(batch["key"], batch["expr"].tolist(), batch["va"].tolist()):
            r = truth[k]
            assert e == (-1 if r["expression"] is None else r["expression"])
            if r["valence"] is None:
                assert np.isnan(va).all()
            else:
                assert va == pytest.approx([r["valence"], r["arousal"]], abs=1e-6)
    assert sum(stream.batches_per_worker()) == len(batches)


def test_train_stream_applies_bootstrap(shards):
    labels = data.read_labels(shards).filter(pl.col("split") == "train")
    loader, stream = data.make_loader(shards, "train", batch_size=8, input_size=32, train=True,
                                      augment=["flip"], seed=3, bootstrap=True)
    counts = Counter(keys_of(collect(loader)))
    expected = {k: data.bootstrap_count(k, 3) for k in labels["key"]}
    assert counts == Counter({k: c for k, c in expected.items() if c})
    assert sum(stream.samples_per_worker()) == sum(expected.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_is_deterministic_for_seed_and_workers(shards, workers):
    def run(seed):
        loader, _ = data.make_loader(shards, "train", batch_size=8, input_size=32, train=True,
                                     augment=["flip", "crop", "color", "affine", "erase"], seed=seed,
                                     epoch=1, bootstrap=True, workers=workers)
        return collect(loader)

    a, b, c = run(5), run(5), run(6)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert keys_of(a) != keys_of(c)
    # shuffled: not in shard order
    plain, _ = data.make_loader(shards, "train", batch_size=8, input_size=32, train=False)
    assert keys_of(a) != keys_of(collect(plain))


def test_epochs_shuffle_differently(shards):
    def run(epoch):
        loader, _ = data.make_loader(shards, "train", batch_size=8, input_size=32, train=True,
                                     seed=1, epoch=epoch, bootstrap=False)
        return keys_of(collect(loader))

    assert run(0) != run(1)
    assert sorted(run(0)) == sorted(run(1))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_position_continues_the_stream_exactly(shards, workers):
    """Batches consumed before a 'kill' + batches of a loader resumed at that position == all."""
    kw = dict(batch_size=5, input_size=32, train=True, augment=["flip", "erase"], seed=2, epoch=0,
              bootstrap=True, workers=workers)
    loader, _ = data.make_loader(shards, "train", **kw)
    full = collect(loader)
    for cut in (1, 3, len(full) - 1):
        position = data.DataPosition.start(0, workers)
        for b in full[:cut]:
            position.advance(b["worker"])
        resumed, _ = data.make_loader(shards, "train", position=position, **kw)
        rest = collect(resumed)
        assert keys_of(full[cut:]) == keys_of(rest), f"cut {cut}"
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(full[cut:], rest))


def test_frame_step_keeps_every_nth_frame_per_video(shards):
    labels = data.read_labels(shards)
    loader, _ = data.make_loader(shards, "train", batch_size=8, input_size=32, train=True,
                                 bootstrap=False, frame_step=3, labels=labels)
    got = set(keys_of(collect(loader)))
    train = labels.filter(pl.col("split") == "train")
    want = set()
    for (_, video), group in train.group_by(["source", "video"]):
        frames = sorted(group["frame"].to_list())
        want |= {f"train/synth/{video}/{f:06d}" for f in frames[::3]}
    assert got == want
    assert 0 < len(got) < train.height
    # validation is never subsampled
    val, _ = data.make_loader(shards, "validation", batch_size=8, input_size=32, train=False,
                              frame_step=3, labels=labels)
    assert len(keys_of(collect(val))) == labels.filter(pl.col("split") == "validation").height


def test_frame_step_mask_ranks_frames_not_values():
    labels = pl.DataFrame({"split": ["train"] * 5, "source": ["s"] * 5, "video": ["a", "a", "a", "b", "b"],
                           "frame": [10, 2, 7, 5, 9]})
    assert data.frame_step_mask(labels, 2).tolist() == [True, True, False, True, False]
    # faces of still images (image sources) are never subsampled
    still = labels.with_columns(still=pl.Series([False, False, False, True, True]))
    assert data.frame_step_mask(still, 2).tolist() == [True, True, False, True, True]


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("name", ["/etc/evil.jpg", "train/../../evil.jpg", "../x/000001.jpg"])
def test_unsafe_member_names_are_refused_naming_the_shard(tmp_path, shards, name):
    root = tmp_path / "bad"
    (root / "train").mkdir(parents=True)
    labels = data.read_labels(shards)
    schemas.write_table(labels, root / "labels.parquet", schemas.LABELS)
    shard = root / "train" / "shard-00000.tar"
    _write_tar(shard, {name: b"not a jpeg"})
    loader, _ = data.make_loader(root, "train", batch_size=4, input_size=32, train=False)
    with pytest.raises(shardio.UnsafeMemberError) as err:
        collect(loader)
    assert str(shard) in str(err.value) and name in str(err.value)


def test_sample_missing_from_labels_is_an_error(tmp_path, shards):
    root = tmp_path / "orphan"
    (root / "train").mkdir(parents=True)
    schemas.write_table(data.read_labels(shards), root / "labels.parquet", schemas.LABELS)
    _write_tar(root / "train" / "shard-00000.tar", {"train/synth/none/000001.jpg": b"x"})
    loader, _ = data.make_loader(root, "train", batch_size=4, input_size=32, train=False)
    with pytest.raises(KeyError, match="no row in labels.parquet"):
        collect(loader)


def test_missing_split_is_a_clear_error(shards):
    with pytest.raises(FileNotFoundError, match="test"):
        data.make_loader(shards, "test", batch_size=4, input_size=32, train=False)


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="blur"):
        augment.build_transform(32, ["flip", "blur"])


# --------------------------------------------------------------------------------------------
# augmentation, decoding, class balance, worker slots


def _jpeg(img_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img_rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


class _Mid:
    """A generator stand-in: uniform draws at the middle of their range, no flip/apply."""

    def uniform(self, a, b):
        return (a + b) / 2

    def random(self):
        return 0.99

    def randint(self, a, b):
        return (a + b) // 2

    def shuffle(self, x):
        pass


def test_colour_matrix_identity_grey_axis_and_ranges():
    m = augment.colour_matrix(_Mid(), mean_grey=100.0)
    assert np.allclose(m, np.hstack([np.eye(3), np.zeros((3, 1))]), atol=1e-9)
    import random as _random

    grey = np.array([80.0, 80.0, 80.0])
    for seed in range(50):
        m = augment.colour_matrix(_random.Random(seed), mean_grey=80.0)
        out = m[:, :3] @ grey + m[:, 3]
        assert np.ptp(out) < 1e-6          # grey stays grey: saturation and hue leave the grey axis alone
        assert 0.49 * 80 <= out[0] <= 1.69 * 80 + 1e-6   # brightness x contrast in [0.7, 1.3]^2 about the mean


def test_augment_is_deterministic_and_each_step_acts():
    import random as _random

    rng = np.random.default_rng(0)
    img = synthetic_image(3, 0.5, -0.5, 64, rng)
    jpg = _jpeg(img)
    plain = augment.build_transform(64)(jpg)
    assert plain.shape == (64, 64, 3) and plain.dtype == np.uint8
    err = np.abs(plain.astype(int) - img).mean()               # RGB order, decoded faithfully
    assert err < 8 and err < np.abs(plain.astype(int) - img[:, :, ::-1]).mean() / 4
    for aug in augment.AUGMENTATIONS:
        t = augment.build_transform(64, [aug])
        outs = [t(jpg, _random.Random(s)) for s in range(12)]
        assert np.array_equal(outs[0], t(jpg, _random.Random(0)))  # same generator, same image
        assert any(not np.array_equal(o, plain) for o in outs), aug
    # flip is the mirror image; crop shifts with a black border
    flipped = next(o for o in (augment.build_transform(64, ["flip"])(jpg, _random.Random(s)) for s in range(20))
                   if not np.array_equal(o, plain))
    assert np.array_equal(flipped, plain[:, ::-1])
    shifted = augment.build_transform(64, ["crop"])(jpg, _random.Random(1))
    dark = (shifted.max(axis=2) == 0)
    assert dark[:, 0].all() or dark[:, -1].all() or dark[0].all() or dark[-1].all() or np.array_equal(shifted, plain)


def test_decode_reduces_large_jpegs_and_reads_headers():
    big = np.full((200, 120, 3), 128, np.uint8)
    jpg = _jpeg(big)
    assert augment.jpeg_size(jpg) == (120, 200)
    assert augment.jpeg_size(b"not a jpeg") is None
    assert augment.decode_bgr(jpg, at_least=30).shape == (50, 30, 3)   # 1/4 scale: still >= 30 px
    assert augment.decode_bgr(jpg, at_least=48).shape == (100, 60, 3)
    assert augment.build_transform(32)(jpg).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="not a decodable image"):
        augment.decode_bgr(b"\xff\xd8garbage")


def test_class_balance_weights():
    expr = np.array([0, 0, 0, 1, -1, 4, 4, 0])
    w = data.class_balance_weights(expr)
    labelled = expr >= 0
    totals = {c: w[expr == c].sum() for c in (0, 1, 4)}
    assert totals[0] == pytest.approx(totals[1]) == pytest.approx(totals[4])
    assert w[labelled].mean() == pytest.approx(1.0) and w[expr == -1].tolist() == [1.0]
    keep = np.array([True, False, False, True, True, True, True, True])
    wk = data.class_balance_weights(expr, keep)   # frequencies over the kept samples
    kept_totals = [wk[keep & (expr == c)].sum() for c in (0, 1, 4)]
    assert kept_totals == pytest.approx([kept_totals[0]] * 3)


def test_loader_class_balance_weights_in_batches(tmp_path):
    root = tmp_path / "imbalanced"
    labels = write_synthetic_shards(root, {"train": 48}, missing=True)
    loader, stream = data.make_loader(root, "train", batch_size=8, input_size=32, train=True,
                                      bootstrap=False, class_balance=True)
    batches = collect(loader)
    expr = torch.cat([b["expr"] for b in batches]).numpy()
    weight = torch.cat([b["weight"] for b in batches]).numpy()
    sums = [weight[expr == c].sum() for c in np.unique(expr[expr >= 0])]
    assert np.allclose(sums, sums[0]) and np.all(weight[expr < 0] == 1)
    plain, _ = data.make_loader(root, "train", batch_size=8, input_size=32, train=True, bootstrap=False)
    assert all(torch.equal(b["weight"], torch.ones(len(b["key"]))) for b in collect(plain))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_worker_batches_equal_in_process_batches_and_stay_valid(shards):
    """Batches made in workers' shared slots are copied out: each kept batch holds its own images,
    the same as without workers (augmentation depends on seed, epoch, key and repeat only)."""
    kw = dict(batch_size=4, input_size=32, train=True, augment=["flip", "crop", "color", "affine", "erase"],
              seed=9, bootstrap=True)

    def by_key(workers):
        loader, _ = data.make_loader(shards, "train", workers=workers, **kw)
        out = {}
        for b in collect(loader):       # all kept: slots are reused many times over meanwhile
            assert b["image"].dtype == torch.uint8 and b["image"].is_contiguous(memory_format=torch.channels_last)
            for k, img, w in zip(b["key"], b["image"], b["weight"]):
                out.setdefault(k, []).append(img.clone())
        return out

    zero, two = by_key(0), by_key(2)
    assert zero.keys() == two.keys()
    for k in zero:   # repeats of a key (bootstrap) may come in another order: compare as sets
        assert sorted(x.sum().item() for x in zero[k]) == sorted(x.sum().item() for x in two[k])


def test_tar_reader_long_names_and_corruption(tmp_path):
    long_key = "train/src/" + "d" * 150 + "/000001"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, payload in ((f"{long_key}.jpg" if fmt != tarfile.USTAR_FORMAT else "short/000001.jpg", b"abc"),
                                  ("a/000002.jpg", b"")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        got = list(shardio.read_tar(str(path)))
        assert [d for _, d in got] == [b"abc", b""]
        assert got[0][0] == (f"{long_key}.jpg" if fmt != tarfile.USTAR_FORMAT else "short/000001.jpg")
    raw = bytearray((tmp_path / f"t{tarfile.PAX_FORMAT}.tar").read_bytes())
    for where, message in ((100, "corrupt tar header"), (600, "corrupt PAX header")):
        bad = bytearray(raw)
        bad[where] ^= 0xFF
        (tmp_path / "bad.tar").write_bytes(bytes(bad))
        with pytest.raises(shardio.ShardError, match=f"bad.tar: {message}"):
            list(shardio.read_tar(str(tmp_path / "bad.tar")))
    (tmp_path / "cut.tar").write_bytes(bytes(raw[:700]))
    with pytest.raises(shardio.ShardError, match="cut.tar: truncated"):
        list(shardio.read_tar(str(tmp_path / "cut.tar")))


def test_read_tar_member_sizes_around_the_block(tmp_path):
    """Members of 0, 1, 511, 512 and 513 bytes (no padding, some, almost a block) read back exactly;
    a tar cut inside a member's padding is truncated."""
    payloads = {f"k/{n:06d}.bin": (bytes(range(256)) * 3)[:n] for n in (0, 1, 511, 512, 513)}
    path = tmp_path / "sizes.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert dict(shardio.read_tar(str(path))) == payloads
    raw = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:512 + 512 + 10])  # inside the 1-byte member's padding
    with pytest.raises(shardio.ShardError, match="cut.tar: truncated member"):
        list(shardio.read_tar(str(tmp_path / "cut.tar")))


def test_hash_draws_are_deterministic_uniform_and_chained():
    a = augment.HashDraws("aug", 1, 0, "train/src/v/000001", 0)
    b = augment.HashDraws("aug", 1, 0, "train/src/v/000001", 0)
    first = [a.random() for _ in range(40)]  # more than one digest's 8 words
    assert first == [b.random() for _ in range(40)]
    assert all(0.0 <= u < 1.0 for u in first) and len(set(first)) == 40
    for other in (("aug", 1, 0, "train/src/v/000001", 1), ("aug", 2, 0, "train/src/v/000001", 0),
                  ("aug", 1, 1, "train/src/v/000001", 0), ("aug", 1, 0, "train/src/v/000002", 0)):
        assert augment.HashDraws(*other).random() != first[0]
    # uniform and randint as random.Random's: bounds kept, every value reached about equally often
    draws = [augment.HashDraws("t", i) for i in range(4000)]
    ints = Counter(d.randint(-2, 2) for d in draws)
    assert set(ints) == {-2, -1, 0, 1, 2} and all(650 <= c <= 950 for c in ints.values())  # 800 expected
    us = np.array([d.uniform(0.7, 1.3) for d in draws])
    assert us.min() >= 0.7 and us.max() < 1.3 and abs(us.mean() - 1.0) < 0.01
    assert np.histogram(us, bins=6, range=(0.7, 1.3))[0].min() > 0.8 * 4000 / 6


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_borrowed_batches_are_the_copied_ones_and_give_their_slots_back(shards):
    """With ``borrow``, each batch's images are a view of its worker's slot until the next batch
    is asked for; used before that, they are the same images as copied batches. The loop runs
    through many more batches than the workers have slots (each slot is given back), twice."""
    kw = dict(batch_size=1, input_size=32, train=True, augment=["flip", "crop", "color"], seed=4,
              bootstrap=False, workers=2)
    copied = collect(data.make_loader(shards, "train", **kw)[0])
    loader, stream = data.make_loader(shards, "train", borrow=True, **kw)
    slots = stream._ring[0].shape[0] * len(stream._ring)
    assert len(copied) > 3 * slots
    for _ in range(2):
        borrowed = []
        for batch in loader:
            assert batch["image"].untyped_storage().data_ptr() in {
                r.untyped_storage().data_ptr() for r in stream._ring}  # no copy: the slot itself
            borrowed.append({"key": batch["key"], "image": batch["image"].clone()})
        assert keys_of(borrowed) == keys_of(copied)
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(borrowed, copied))
    # copied batches own their memory: all still distinct after the loop
    assert len({b["image"].untyped_storage().data_ptr() for b in copied}) == len(copied)


# --------------------------------------------------------------------------------------------
# ranks and the shared-memory ring


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_split_each_batch_without_duplicates_or_gaps(shards, workers):
    """Three ranks read the one-process stream's batches and each decodes its contiguous part:
    the parts' images put together are the one-process batch (same bootstrap counts and
    augmentation draws), so every sample of the epoch is trained on exactly once across ranks."""
    kw = dict(batch_size=8, input_size=32, train=True, augment=["flip", "crop", "erase"], seed=4, epoch=1,
              bootstrap=True, workers=workers)
    whole = collect(data.make_loader(shards, "train", **kw)[0])
    ranks = [collect(data.make_loader(shards, "train", rank=r, world=3, **kw)[0]) for r in range(3)]
    assert all(len(r) == len(whole) for r in ranks)
    seen: Counter = Counter()
    for i, batch in enumerate(whole):
        n = len(batch["key"])
        parts = [r[i] for r in ranks]
        bounds = [p["part"] for p in parts]
        assert bounds == [(n * r // 3, n * (r + 1) // 3) for r in range(3)]
        assert [b - a for a, b in bounds] == [p["image"].shape[0] for p in parts]
        for p in parts:  # labels and keys: the whole batch, for the loss's denominators
            assert p["key"] == batch["key"] and torch.equal(p["expr"], batch["expr"])
        assert torch.equal(torch.cat([p["image"] for p in parts]), batch["image"])
        for p, (a, b) in zip(parts, bounds):
            seen.update(p["key"][a:b])
    expected = {k: data.bootstrap_count(k, 4) for k in data.read_labels(shards).filter(pl.col("split") == "train")["key"]}
    assert seen == Counter({k: c for k, c in expected.items() if c})  # each repeat once, none missing


def test_shared_memory_ring_is_sized_from_batch_workers_and_free_space(shards, monkeypatch):
    """The ring was workers x 6 slots x batch whatever /dev/shm held (about 7.4 GiB at batch 1024,
    224 px, 8 workers: a bus error in a container's 64 MB). Now: 6 slots when they take at most
    half the free space, fewer down to 3, and an error at once below that."""
    slot = 8 * 32 * 32 * 3
    assert data.ring_slots(2, slot, 100 * slot) == data.PREFETCH + 2
    assert data.ring_slots(2, slot, 8 * slot) == 3  # half of 8 slots: 4 for 2 workers -> 2, raised to 3
    assert data.ring_slots(2, slot, 14 * slot) == 3
    assert data.ring_slots(2, slot, 20 * slot) == 5
    with pytest.raises(RuntimeError, match=r"/dev/shm has [0-9.]+ MiB free; the loader needs [0-9.]+ MiB of shared "
                                           r"memory \(2 workers x 3 batch slots x [0-9.]+ MiB\).*--shm-size"):
        data.ring_slots(2, slot, 5 * slot)
    paper = 1024 * 224 * 224 * 3  # one batch of the paper: 147 MiB
    assert data.ring_slots(8, paper, 8 * 2**30) == 3  # 8 GiB free: 3 slots per worker (3.4 GiB)
    with pytest.raises(RuntimeError, match="/dev/shm has 64.0 MiB free; the loader needs 3528.0 MiB"):
        data.ring_slots(8, paper, 64 * 2**20)  # a container's default /dev/shm
    monkeypatch.setattr(data, "shm_free_bytes", lambda path=data.SHM: 10 * slot)
    loader, stream = data.make_loader(shards, "train", batch_size=8, input_size=32, train=True, workers=2)
    assert [tuple(r.shape) for r in stream._ring] == [(3, 8, 32, 32, 3)] * 2
    assert sum(len(b["key"]) for b in loader) == 60  # a working loader with one batch in flight per worker
    # a rank's slots hold its part only
    _, ranked = data.make_loader(shards, "train", batch_size=8, input_size=32, train=True, workers=2, rank=1, world=3)
    assert ranked._ring[0].shape[1] == 3  # parts of 8 over 3 ranks: 2, 3, 3
    monkeypatch.setattr(data, "shm_free_bytes", lambda path=data.SHM: 2 * slot)
    with pytest.raises(RuntimeError, match="/dev/shm has"):
        data.make_loader(shards, "train", batch_size=8, input_size=32, train=True, workers=2)
