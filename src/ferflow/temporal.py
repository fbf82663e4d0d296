"""The temporal stage: a small transformer over windows of one variant's per-frame features.

    python -m ferflow.temporal train --features results/features/V/train.parquet \\
        --accounting results/accounting.parquet --settings '{"window": 64, ...}' \\
        --out results/temporal/V/model.pt
    python -m ferflow.temporal predict --model results/temporal/V/model.pt \\
        --features results/features/V/validation.parquet --out results/temporal/V/validation.parquet

Input: a FEATURES table (``schemas.FEATURES``, written by ``ferflow.predict --features`` from the
variant's forward pass): per frame of a (video, person) the fused DAN vector, the variant's class
probabilities and VA, and whether the frame had a face crop. Each frame's input vector is
``[feature, p0..p7, valence, arousal]`` (nulls -> 0; frames without a face are masked anyway).

Model (:class:`TemporalHead`): each input dimension standardised with the mean and standard
deviation of the training frames with a face (stored in the model), a linear projection to
``d_model``, plus the
sinusoidal position encoding of Vaswani et al. 2017 ("Attention is all you need", sec. 3.5) over
the frame's position in its window, then ``torch.nn.TransformerEncoder`` (``layers`` post-norm
layers, ``heads`` attention heads) whose ``src_key_padding_mask`` hides frames without a face and
window positions without a frame (padding beyond a sequence's ends or gaps in the annotation), so
no output depends on them; then per frame an expression head (8 logits) and a VA head (tanh).
A frame without a face still gets outputs: its query attends to the faces around it.
With ``residual`` (default) the heads refine the variant's own prediction of the frame: the
expression logits are ``log p_frame + head(h)`` and VA ``tanh(atanh(va_frame) + head(h))``, with
both heads' weights initialised to zero, so that an untrained head reproduces the frame-level
prediction exactly and training learns only the correction from context (frames without a face
have no frame-level prediction: uniform and 0).

Windows: ``window`` consecutive frame numbers of one (source, video); window ``j`` of a sequence
starting at frame ``f0`` is centred on ``f0 + j * (window // 2)`` (training shifts all centres by a
random offset each epoch). Prediction uses the unshifted windows and keeps, for each frame, the
output of the window whose centre is nearest (so every frame has at least ``window // 4`` frames of
context on each side where the sequence has them). A frame whose window holds no face at all gets
no prediction (the evaluation fills it from its neighbours, as for frame-level predictions).

Losses (:func:`window_loss`): the project's focal loss for expression and ``1 - CCC`` for VA
(:mod:`ferflow.losses`), over the frames that have a face crop and the task's label, exactly the
frames frame-level training sees; frames without a face or without the label do not count.

Outputs: ``model.pt`` (``state_dict`` and settings; read back with ``torch.load(weights_only=True)``)
and a PREDICTIONS table (``schemas.PREDICTIONS``), the same format as the frame-level predictions,
so :mod:`ferflow.evaluate` scores and soft-votes both with the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from . import schemas
from .atomic import atomic_path
from .inputcheck import prog_of, require_inputs
from .labels import NUM_EXPRESSIONS
from .losses import ccc_loss, focal_loss
from .model import read_checkpoint
from .truth import PROB_COLS, VA_COLS, load_ground_truth

log = logging.getLogger("ferflow.temporal")

DEFAULTS = {"window": 64, "d_model": 64, "heads": 4, "layers": 2, "dim_feedforward": 128, "dropout": 0.1,
            "epochs": 15, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4, "focal_gamma": 2.0, "seed": 0,
            "residual": True}
PRIOR_COLS = 10  # the last input columns: the variant's p0..p7, valence, arousal (see sequences_from_features)


def settings_with_defaults(settings: Mapping | None) -> dict:
    """``settings`` over :data:`DEFAULTS`; ValueError naming an unknown key or an even/short window."""
    out = dict(DEFAULTS)
    unknown = sorted(set(settings or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"temporal settings: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    out.update(settings or {})
    if int(out["window"]) < 1:
        raise ValueError(f"temporal settings: window must be >= 1, got {out['window']}")
    return out


# --------------------------------------------------------------------------------------------
# sequences and windows


@dataclass
class Sequences:
    """Frames of one split sorted by (sequence, frame), as arrays.

    ``seq`` int64 (N,) sequence id (one per (source, video)), ``frame`` int64 (N,), ``x`` float32
    (N, D) input vectors (zeros where ``has_face`` is false), ``has_face`` bool (N,), ``expr`` int64
    (N,) class or -1 (no label), ``va`` float32 (N, 2) or NaN (no label)."""

    seq: np.ndarray
    frame: np.ndarray
    x: np.ndarray
    has_face: np.ndarray
    expr: np.ndarray
    va: np.ndarray

    @property
    def n(self) -> int:
        return int(self.seq.shape[0])


def sequences_from_features(features: pl.DataFrame, labels: pl.DataFrame | None = None) -> Sequences:
    """:class:`Sequences` of a FEATURES table, with the labels of ``labels`` (columns source,
    video, frame, expression, valence, arousal; e.g. ``GroundTruth.frame_table()``) joined on
    (source, video, frame); without ``labels`` every frame is unlabelled."""
    df = features.sort("source", "video", "frame")
    if labels is not None:
        df = df.join(labels.select("source", "video", "frame", "expression",
                                   pl.col("valence").alias("_v"), pl.col("arousal").alias("_a")),
                     on=["source", "video", "frame"], how="left")
    seq = (df["source"].ne_missing(df["source"].shift(1)) | df["video"].ne_missing(df["video"].shift(1)))
    seq = seq.fill_null(True).cast(pl.Int64).cum_sum().to_numpy() - 1
    has_face = df["has_face"].to_numpy().astype(bool)
    width = df.schema["feature"].size if isinstance(df.schema["feature"], pl.Array) else None
    feat = np.zeros((df.height, width or schemas.FEATURE_DIM), np.float32)
    if has_face.any():
        feat[has_face] = np.asarray(df.filter(pl.Series(has_face))["feature"].to_numpy(), np.float32)
    extra = np.column_stack([df[c].cast(pl.Float32).fill_null(0.0).to_numpy() for c in PROB_COLS + VA_COLS])
    x = np.concatenate([feat, extra.astype(np.float32)], axis=1)
    x[~has_face] = 0.0
    if labels is not None:
        expr = df["expression"].cast(pl.Int64).fill_null(-1).to_numpy()
        va = np.column_stack([df[c].cast(pl.Float32).fill_null(np.nan).to_numpy() for c in ("_v", "_a")])
    else:
        expr = np.full(df.height, -1, np.int64)
        va = np.full((df.height, 2), np.nan, np.float32)
    return Sequences(seq, df["frame"].to_numpy().astype(np.int64), x, has_face, expr, va.astype(np.float32))


def make_windows(seq: np.ndarray, frame: np.ndarray, window: int, shift: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows over sorted (``seq``, ``frame``) rows.

    Returns ``(index, owner, position)``: ``index`` int64 (M, window), the row at each window position
    or -1 (no frame there); ``owner`` int64 (N,), for each row the window whose centre is nearest
    to it (prediction keeps that window's output), ``position`` int64 (N,) the row's position in it.
    Window centres of a sequence starting at frame ``f0`` lie at ``f0 - shift + j * max(1, window // 2)``."""
    hop = max(1, window // 2)
    half = window // 2
    n = seq.size
    if n == 0:
        return np.zeros((0, window), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    is_start = np.r_[True, seq[1:] != seq[:-1]]
    run = np.cumsum(is_start) - 1  # sequence number of each row, 0..S-1
    first_rows = np.flatnonzero(is_start)
    last_rows = np.r_[first_rows[1:] - 1, n - 1]
    f0 = frame[first_rows] - shift
    n_win = (frame[last_rows] - f0 + hop - 1) // hop + 1  # centres f0 + j * hop, j < n_win, reach the last frame
    base = np.r_[0, np.cumsum(n_win)[:-1]]
    rel = frame - f0[run]  # >= shift >= 0
    # window j covers rel in [j * hop - half, j * hop - half + window): the row lies in windows
    # j_max, j_max - 1, ... (j_max = (rel + half) // hop) while j >= 0 and the window reaches it
    index = np.full((int(n_win.sum()), window), -1, np.int64)
    j_max = (rel + half) // hop
    rows = np.arange(n)
    for k in range(window // hop + 2):
        j = j_max - k
        pos = rel - (j * hop - half)
        ok = (j >= 0) & (j < n_win[run]) & (pos < window)
        index[base[run[ok]] + j[ok], pos[ok]] = rows[ok]
    j_of = np.minimum(np.rint(rel / hop).astype(np.int64), n_win[run] - 1)
    owner = base[run] + j_of
    position = rel - (j_of * hop - half)
    keep = (index >= 0).any(axis=1)
    remap = np.cumsum(keep) - 1
    return index[keep], remap[owner], position


# --------------------------------------------------------------------------------------------
# the model


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """(length, dim) float32 position encoding of Vaswani et al. 2017, sec. 3.5:
    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * rate)
    pe[:, 1::2] = torch.cos(pos * rate)[:, : dim // 2]
    return pe


class TemporalHead(nn.Module):
    """Transformer encoder over windows of per-frame vectors (see the module docstring).

    ``forward(x, valid)``: ``x`` float32 (B, W, in_dim), ``valid`` bool (B, W) (frames with a face);
    returns ``(logits (B, W, 8), va (B, W, 2) in [-1, 1])``. A window without any valid frame is
    run unmasked (its outputs are meaningless and callers drop them) so that no NaN appears."""

    def __init__(self, in_dim: int, window: int, d_model: int = 64, heads: int = 4, layers: int = 2,
                 dim_feedforward: int = 128, dropout: float = 0.1, residual: bool = False):
        super().__init__()
        if residual and in_dim < PRIOR_COLS:
            raise ValueError(f"a residual temporal head needs the {PRIOR_COLS} probability/VA columns; in_dim is {in_dim}")
        self.residual = bool(residual)
        # per-dimension standardisation, set from the training frames by train_head (saved with the weights)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.proj = nn.Linear(in_dim, d_model)
        self.register_buffer("positions", sinusoidal_positions(window, d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward, dropout, batch_first=True)
        # no nested tensors: they would zero the outputs of masked frames, which still get predictions
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.expr = nn.Linear(d_model, NUM_EXPRESSIONS)
        self.va = nn.Linear(d_model, 2)
        if self.residual:
            for head in (self.expr, self.va):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        raw = x
        x = torch.where(valid[..., None], (x - self.mean) * self.scale, torch.zeros_like(x))
        h = self.proj(x) + self.positions[: x.shape[1]]
        pad = ~valid
        pad = pad & ~pad.all(dim=1, keepdim=True)
        h = self.encoder(h, src_key_padding_mask=pad)
        logits, va = self.expr(h), self.va(h)
        if self.residual:
            prior = torch.where(valid[..., None], raw[..., -PRIOR_COLS:], torch.zeros_like(raw[..., -PRIOR_COLS:]))
            logits = logits + torch.log(prior[..., :NUM_EXPRESSIONS].clamp_min(1e-6))
            va = va + torch.atanh(prior[..., NUM_EXPRESSIONS:].clamp(-0.999, 0.999))
        return logits, torch.tanh(va)


def build_head(settings: Mapping, in_dim: int) -> TemporalHead:
    s = settings_with_defaults(settings)
    return TemporalHead(in_dim, int(s["window"]), int(s["d_model"]), int(s["heads"]), int(s["layers"]),
                        int(s["dim_feedforward"]), float(s["dropout"]), bool(s["residual"]))


def gather(seqs: Sequences, index: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch tensors of windows ``index`` (B, W): x (B, W, D), valid (B, W) bool (a face is there),
    expression targets (B, W) (-1: no label, no face or no frame), VA targets (B, W, 2) (NaN likewise)."""
    present = index >= 0
    rows = np.where(present, index, 0)
    valid = present & seqs.has_face[rows]
    x = np.where(valid[..., None], seqs.x[rows], 0.0).astype(np.float32)
    expr = np.where(valid, seqs.expr[rows], -1)
    va = np.where(valid[..., None], seqs.va[rows], np.nan).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(valid), torch.from_numpy(expr), torch.from_numpy(va)


def window_loss(model: TemporalHead, x: Tensor, valid: Tensor, expr: Tensor, va: Tensor,
                focal_gamma: float = 2.0) -> Tensor:
    """Focal loss (expression) + ``1 - CCC`` (VA) over every frame of the batch of windows whose
    target is present (``expr`` -1 and NaN VA are left out; :func:`gather` sets them for frames
    without a face or a label)."""
    logits, va_pred = model(x, valid)
    return (focal_loss(logits.reshape(-1, NUM_EXPRESSIONS), expr.reshape(-1), gamma=focal_gamma)
            + ccc_loss(va_pred.reshape(-1, 2), va.reshape(-1, 2)))


def train_head(seqs: Sequences, settings: Mapping, log_every: int = 1) -> TemporalHead:
    """Train a :class:`TemporalHead` on ``seqs`` (Adam, fixed epochs, seeded, on the CPU). Each
    epoch draws a random shift of the window centres and shuffles the windows; windows that hold a
    single frame (still images: no context) are left out. Returns the model in eval mode."""
    s = settings_with_defaults(settings)
    torch.manual_seed(int(s["seed"]))
    rng = np.random.default_rng(int(s["seed"]))
    model = build_head(s, seqs.x.shape[1])
    faces = seqs.x[seqs.has_face]
    if faces.shape[0]:
        model.mean.copy_(torch.from_numpy(faces.mean(axis=0)))
        model.scale.copy_(torch.from_numpy(1.0 / np.maximum(faces.std(axis=0), 1e-6)))
    opt = torch.optim.Adam(model.parameters(), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]))
    window, bs = int(s["window"]), int(s["batch_size"])
    model.train()
    for epoch in range(int(s["epochs"])):
        index, _, _ = make_windows(seqs.seq, seqs.frame, window, shift=int(rng.integers(0, max(1, window // 2))))
        # a window holding one frame (a still image of an image source) has no context to learn from
        index = index[(index >= 0).sum(axis=1) >= min(2, window)]
        order = rng.permutation(index.shape[0])
        total, batches = 0.0, 0
        for lo in range(0, order.size, bs):
            x, valid, expr, va = gather(seqs, index[order[lo:lo + bs]])
            loss = window_loss(model, x, valid, expr, va, float(s["focal_gamma"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach())
            batches += 1
        if log_every and (epoch + 1) % log_every == 0:
            log.info("epoch %d/%d: %d windows, mean loss %.4f", epoch + 1, int(s["epochs"]), index.shape[0],
                     total / max(1, batches))
    model.eval()
    return model


@torch.no_grad()
def predict_head(model: TemporalHead, seqs: Sequences, window: int, batch_size: int = 256
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row softmax probabilities (N, 8) and VA (N, 2), each from the window whose centre is
    nearest to the row (:func:`make_windows`), and ``ok`` (N,) bool: false for rows whose window
    holds no face (their values are NaN)."""
    model.eval()
    index, owner, position = make_windows(seqs.seq, seqs.frame, window)
    probs = np.full((seqs.n, NUM_EXPRESSIONS), np.nan, np.float32)
    va = np.full((seqs.n, 2), np.nan, np.float32)
    has_any = np.zeros(index.shape[0], bool)
    out_p = np.empty((index.shape[0], window, NUM_EXPRESSIONS), np.float32)
    out_v = np.empty((index.shape[0], window, 2), np.float32)
    for lo in range(0, index.shape[0], batch_size):
        x, valid, _, _ = gather(seqs, index[lo:lo + batch_size])
        logits, v = model(x, valid)
        out_p[lo:lo + batch_size] = torch.softmax(logits, dim=-1).numpy()
        out_v[lo:lo + batch_size] = v.numpy()
        has_any[lo:lo + batch_size] = valid.any(dim=1).numpy()
    ok = has_any[owner] if seqs.n else np.zeros(0, bool)
    probs[ok] = out_p[owner[ok], position[ok]]
    va[ok] = out_v[owner[ok], position[ok]]
    return probs, va, ok


# --------------------------------------------------------------------------------------------
# files


def save_head(model: TemporalHead, settings: Mapping, in_dim: int, path: str | Path) -> None:
    """``model.pt``: {"state_dict", "settings" (with defaults), "in_dim"}, written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "settings": settings_with_defaults(settings),
                    "in_dim": int(in_dim)}, tmp)


def load_head(path: str | Path) -> tuple[TemporalHead, dict]:
    """A head saved by :func:`save_head` (``torch.load(weights_only=True)``), in eval mode.
    KeyError names a file that is not a temporal head."""
    ckpt = read_checkpoint(path, ("state_dict", "settings", "in_dim"), "ferflow temporal head")
    model = build_head(ckpt["settings"], int(ckpt["in_dim"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, dict(ckpt["settings"])


def predictions_table(features: pl.DataFrame, probs: np.ndarray, va: np.ndarray, ok: np.ndarray) -> pl.DataFrame:
    """PREDICTIONS rows (sorted by source, video, frame, like ``features`` sorted) of the rows with a
    prediction (``ok``)."""
    df = features.sort("source", "video", "frame").select("split", "source", "video", "frame")
    cols = {c: probs[:, i] for i, c in enumerate(PROB_COLS)}
    cols.update({c: va[:, i] for i, c in enumerate(VA_COLS)})
    df = df.with_columns(**{k: pl.Series(k, v, pl.Float32) for k, v in cols.items()})
    return schemas.conform(df.filter(pl.Series(ok)), schemas.PREDICTIONS, "temporal predictions")


def train_main(args) -> int:
    require_inputs(f"{prog_of('temporal')} train", [("--features", args.features, "file"),
                                                        ("--accounting", args.accounting, "file")])
    settings = settings_with_defaults(json.loads(args.settings) if args.settings else {})
    if args.threads:
        torch.set_num_threads(args.threads)
    features = schemas.read_table(args.features, schemas.FEATURES)
    split = features["split"][0] if features.height else args.split
    labels = load_ground_truth(args.accounting, split).frame_table()
    seqs = sequences_from_features(features, labels)
    log.info("%s: %d frames in %d sequences (%d with a face, %d with expression, %d with VA)", args.features,
             seqs.n, int(seqs.seq.max()) + 1 if seqs.n else 0, int(seqs.has_face.sum()),
             int(((seqs.expr >= 0) & seqs.has_face).sum()),
             int((~np.isnan(seqs.va).any(axis=1) & seqs.has_face).sum()))
    t0 = time.perf_counter()
    model = train_head(seqs, settings)
    log.info("trained in %.1f s", time.perf_counter() - t0)
    save_head(model, settings, seqs.x.shape[1], args.out)
    log.info("wrote %s", args.out)
    return 0


def predict_main(args) -> int:
    require_inputs(f"{prog_of('temporal')} predict", [("--model", args.model, "file"),
                                                          ("--features", args.features, "file")])
    if args.threads:
        torch.set_num_threads(args.threads)
    model, settings = load_head(args.model)
    features = schemas.read_table(args.features, schemas.FEATURES)
    seqs = sequences_from_features(features)
    probs, va, ok = predict_head(model, seqs, int(settings["window"]))
    table = predictions_table(features, probs, va, ok)
    schemas.write_table(table, args.out, schemas.PREDICTIONS)
    log.info("wrote %d predictions (%d frames without a face in any window left to the evaluation's filling) to %s",
             table.height, int((~ok).sum()), args.out)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_of("temporal"), description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the temporal head of one variant on its training-split features")
    t.add_argument("--features", required=True, help="FEATURES parquet of the training split")
    t.add_argument("--accounting", required=True, help="ACCOUNTING parquet (the labels)")
    t.add_argument("--settings", default=None, help="JSON object of temporal settings (defaults: %s)" % json.dumps(DEFAULTS))
    t.add_argument("--split", default="train", help="split of the labels when the features table is empty")
    t.add_argument("--out", required=True, help="model.pt to write")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads")
    q = sub.add_parser("predict", help="per-frame predictions of a trained temporal head")
    q.add_argument("--model", required=True, help="model.pt written by `train`")
    q.add_argument("--features", required=True, help="FEATURES parquet of the split to predict")
    q.add_argument("--out", required=True, help="PREDICTIONS parquet to write")
    q.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return train_main(args) if args.command == "train" else predict_main(args)
    except (ValueError, KeyError) as exc:  # SchemaError and EvaluationError are ValueErrors
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str(KeyError) adds quotes
        print(f"{prog_of('temporal')}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
