"""Predict every sample of one split with a trained variant.

    python -m ferflow.predict --model results/models/V/model.pt --shards results/shards \\
        --split validation --out results/predictions/V/validation.parquet

Rebuilds the model from ``model.pt`` (``torch.load(weights_only=True)``; the pretrained weight
file is not read again), reads the split's shards without augmentation and writes a PREDICTIONS
table (``schemas.PREDICTIONS``): one row per sample, softmax probabilities p0..p7 in ABAW order and
valence/arousal. A variant trained for one task only leaves the other task's columns null (its
untrained head would otherwise look like a prediction). Rows are sorted by source, video, frame.

With ``--features F --accounting A`` the same forward pass also writes a FEATURES table
(``schemas.FEATURES``), the input of the temporal stage: one row per scored frame of the split in
the accounting (written, or dropped as no_face / unreadable_frame), with the model's fused vector
(the input of its ``fc`` head), its probabilities and VA; frames without a face crop are rows with
``has_face`` false and nulls. The PREDICTIONS table is the same with or without it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

from . import data, devices, schemas
from .model import load_model
from .inputcheck import prog_of, require_inputs
from .labels import NUM_EXPRESSIONS
from .truth import PROB_COLS, VA_COLS, is_scored

log = logging.getLogger("ferflow.predict")


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def infer(model: torch.nn.Module, loader, device: torch.device, features: list | None = None
          ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, softmax probabilities (n, 8) and valence/arousal (n, 2) for every sample of ``loader``.

    ``features``: a list that receives the fused vectors of the same forward pass (float32 (b, 512)
    arrays, one per batch): the input of the model's expression head ``fc`` (the vector that both
    heads read), taken by a forward hook, so the model's outputs and weights are those of any
    other pass; None (default) keeps none."""
    was_training = model.training
    model.eval()
    keys: list[str] = []
    probs: list[torch.Tensor] = []
    vas: list[torch.Tensor] = []
    hook = None
    if features is not None:
        hook = model.fc.register_forward_hook(
            lambda module, args, output: features.append(args[0].detach().float().cpu().numpy()))
    try:
        for batch in loader:
            with autocast(device):
                out = model(to_device(batch["image"], device))
            probs.append(torch.softmax(out.expr.float(), dim=1).cpu())
            vas.append(out.va.float().cpu())
            keys.extend(batch["key"])
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    if not keys:
        return keys, np.zeros((0, NUM_EXPRESSIONS), np.float32), np.zeros((0, 2), np.float32)
    return keys, torch.cat(probs).numpy(), torch.cat(vas).numpy()


def features_table(keys, fused: np.ndarray, predictions: pl.DataFrame, accounting: pl.DataFrame,
                   split: str) -> pl.DataFrame:
    """FEATURES rows of ``split``: every scored frame of the accounting (``truth.SCORED_REASONS``).

    ``keys`` and ``fused`` (n, 512) are the forward pass's sample keys and fused vectors,
    ``predictions`` its PREDICTIONS table (probabilities and VA, possibly null for an untrained
    task). Written frames take their row by sample key; frames without a crop get has_face false
    and nulls. KeyError when a written frame of the split was not predicted."""
    scored = accounting.filter((pl.col("split") == split) & is_scored())
    fused = np.asarray(fused, np.float32).reshape(len(keys), schemas.FEATURE_DIM)
    by_key = pl.DataFrame({"key": list(keys), "feature": pl.Series("feature", fused,
                                                                   pl.Array(pl.Float32, schemas.FEATURE_DIM))})
    values = predictions.select("source", "video", "frame", *PROB_COLS, *VA_COLS)
    rows = (scored.select("split", "source", "video", "frame", "key", has_face=pl.col("status") == "written")
            .join(by_key, on="key", how="left")
            .join(values, on=["source", "video", "frame"], how="left"))
    lost = rows.filter(pl.col("has_face") & pl.col("feature").is_null())
    if lost.height:
        raise KeyError(f"{lost.height} written frames of {split} have no prediction, e.g. {lost['key'][0]!r}")
    return schemas.conform(rows.sort("source", "video", "frame"), schemas.FEATURES, "features")


def predictions_table(keys, probs, va, labels: pl.DataFrame, task: str = "both") -> pl.DataFrame:
    """PREDICTIONS rows for ``keys``, with split/source/video/frame joined from labels.parquet."""
    cols: dict[str, object] = {"key": keys}
    for i in range(NUM_EXPRESSIONS):
        cols[f"p{i}"] = probs[:, i].astype(np.float32)
    cols["valence"] = va[:, 0].astype(np.float32)
    cols["arousal"] = va[:, 1].astype(np.float32)
    pred = pl.DataFrame(cols)
    if task == "va":
        pred = pred.with_columns([pl.lit(None, pl.Float32).alias(f"p{i}") for i in range(NUM_EXPRESSIONS)])
    elif task == "expr":
        pred = pred.with_columns(pl.lit(None, pl.Float32).alias(c) for c in ("valence", "arousal"))
    joined = pred.join(labels.select("key", "split", "source", "video", "frame"), on="key", how="left")
    missing = joined.filter(pl.col("split").is_null())
    if missing.height:
        raise KeyError(f"{missing.height} predicted keys are not in labels.parquet, e.g. {missing['key'][0]!r}")
    return schemas.conform(joined.sort("source", "video", "frame"), schemas.PREDICTIONS, "predictions")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_of("predict"), description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model.pt written by ferflow.train")
    p.add_argument("--shards", required=True, help="shard folder (holds <split>/ and labels.parquet)")
    p.add_argument("--split", default="validation", help="split of the shards to predict (default: validation)")
    p.add_argument("--out", required=True, help="PREDICTIONS parquet to write")
    p.add_argument("--features", default=None, help="also write the FEATURES parquet of the split here "
                   "(the temporal stage's input; needs --accounting)")
    p.add_argument("--accounting", default=None, help="ACCOUNTING parquet: the split's frames, with or without a face")
    p.add_argument("--device", default="auto", help="auto (claim a free GPU, else CPU) | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0, load in the main process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default: torch's choice; pass the job's cores)")
    p.add_argument("--lock-dir", default=None, help="GPU lock folder (default: $FERFLOW_GPU_LOCK_DIR or a temp folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.features is None) != (args.accounting is None):
        parser.error("--features and --accounting go together")
    require_inputs(prog_of("predict"), [("--model", args.model, "file"), ("--shards", args.shards, "dir"),
                                        ("--shards", Path(args.shards) / "labels.parquet", "file")]
                   + ([("--accounting", args.accounting, "file")] if args.accounting else []))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    with devices.select_device(args.device, args.lock_dir) as device:
        model, settings = load_model(args.model, device)
        labels = data.read_labels(args.shards)
        loader, stream = data.make_loader(
            args.shards, args.split, batch_size=args.batch_size, input_size=int(settings["input_size"]),
            train=False, workers=args.workers, labels=labels, pin_memory=device.type == "cuda", borrow=True,
        )
        fused: list | None = [] if args.features else None
        keys, probs, va = infer(model, loader, device, fused)
    if len(keys) != len(stream.index):
        raise RuntimeError(f"{args.split}: predicted {len(keys)} samples, labels.parquet lists {len(stream.index)}")
    table = predictions_table(keys, probs, va, labels, settings.get("task", "both"))
    schemas.write_table(table, args.out, schemas.PREDICTIONS)
    log.info("wrote %d predictions of %s to %s", table.height, args.split, args.out)
    if args.features:
        accounting = schemas.read_table(args.accounting, schemas.ACCOUNTING)
        vectors = np.concatenate(fused) if fused else np.zeros((0, schemas.FEATURE_DIM), np.float32)
        feats = features_table(keys, vectors, table, accounting, args.split)
        schemas.write_table(feats, args.features, schemas.FEATURES)
        log.info("wrote %d frames of %s (%d with a face) to %s", feats.height, args.split,
                 int(feats["has_face"].sum()), args.features)
    return 0


if __name__ == "__main__":
    sys.exit(main())
