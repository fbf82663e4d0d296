"""Train one variant of the extended DAN.

    python -m ferflow.train --shards results/shards --settings '{"name": "v1", "seed": 1}' \\
        --out results/models/v1 [--device auto|cpu|cuda] [--resume/--no-resume]

``--settings`` is the variant's merged settings (the ``train_settings`` keys of
``workflow/schemas/config.schema.yaml`` plus ``name`` and ``seed``), as a JSON string or a JSON /
YAML file; missing keys take :data:`DEFAULTS`.

Outputs in ``--out``:

- ``last.pt``: the resumable checkpoint (see :func:`save_checkpoint`), written atomically at every
  epoch end and every ``checkpoint_every`` steps. A job killed at any moment and started again
  (``--resume`` is the default) continues from it and, on the CPU, ends with exactly the weights of
  an uninterrupted run of the same seed.
- ``model.pt``: the final weights for prediction: ``{"model_state_dict", "settings",
  "model_config", "epoch"}``, tensors and primitives only (``torch.load(weights_only=True)``).
- ``history.csv`` and ``curves.png``: per-epoch learning rate, loss parts, training images/s and,
  when the shards have a validation split, its expression macro F1 and mean VA CCC.

Read top to bottom: get_args_parser, load_data, train_one_epoch, evaluate, main.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import data, devices, metrics, shardio
from .atomic import atomic_path, write_text
from .inputcheck import require_inputs
from .predict import autocast, infer, to_device

log = logging.getLogger("ferflow.train")

#: The one place where training defaults live.
DEFAULTS: dict[str, Any] = {
    "name": "variant",
    "seed": 0,
    "backbone": "resnet18",
    "pretrained": None,
    "heads": 4,
    "task": "both",
    "input_size": 112,
    "epochs": 3,
    "batch_size": 64,
    "lr": 1e-3,
    "optimizer": "adam",
    "weight_decay": 1e-4,
    "schedule": "exponential",
    "lr_gamma": 0.6,
    "grad_clip": 1.0,
    "focal_gamma": 2.0,
    "class_weights": None,
    "loss_weights": {"expr": 1.0, "va": 1.0, "affinity": 1.0, "partition": 1.0},
    "bootstrap": True,
    "frame_step": 1,
    "class_balance": False,
    "augment": ["flip"],
    "workers": 0,
    "checkpoint_every": 0,
}
#: Keys a variant may carry that training does not use.
IGNORED_KEYS = ("weight",)
LOSS_PARTS = ("total", "expr", "va", "affinity", "partition")
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------
# settings and arguments


def resolve_settings(given: dict) -> dict:
    """``given`` over :data:`DEFAULTS`; unknown keys are an error."""
    unknown = sorted(set(given) - set(DEFAULTS) - set(IGNORED_KEYS))
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; known: {sorted(DEFAULTS)}")
    settings = copy.deepcopy(DEFAULTS)
    for key, value in given.items():
        if key in IGNORED_KEYS:
            continue
        if key == "loss_weights" and value is not None:
            bad = sorted(set(value) - set(DEFAULTS["loss_weights"]))
            if bad:
                raise ValueError(f"unknown loss_weights {bad}; known: {sorted(DEFAULTS['loss_weights'])}")
            settings["loss_weights"].update({k: float(v) for k, v in value.items()})
        else:
            settings[key] = copy.deepcopy(value)
    settings["augment"] = list(settings["augment"] or [])
    return settings


def read_settings(text: str) -> dict:
    """A JSON string, or the path of a JSON or YAML file."""
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        content = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(content) or {}
        return json.loads(content)
    return json.loads(text)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ferflow.train", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="shard folder (holds <split>/ and labels.parquet)")
    p.add_argument("--settings", default="{}", help="variant settings: JSON string or JSON/YAML file")
    p.add_argument("--out", required=True, help="output folder (last.pt, model.pt, history.csv, curves.png)")
    p.add_argument("--device", default="auto", help="auto (claim a free GPU, else CPU) | cpu | cuda")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from <out>/last.pt when it exists (default: on)")
    p.add_argument("--train-split", default="train", help="split of the shards to train on (default: train)")
    p.add_argument("--val-split", default="validation", help="evaluated after each epoch when present")
    p.add_argument("--lock-dir", default=None, help="GPU lock folder (default: $FERFLOW_GPU_LOCK_DIR or a temp folder)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default: torch's choice; pass the job's cores)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


# --------------------------------------------------------------------------------------------
# data


def load_data(shards: str | Path, settings: dict, train_split: str, val_split: str):
    """Label indexes of the training split and (when it has shards) the validation split."""
    labels = data.read_labels(shards)
    if not shardio.list_shards(shards, train_split):
        raise FileNotFoundError(f"{Path(shards) / train_split}: no shard-*.tar files to train on")
    train_index = data.label_index(labels, train_split, int(settings["frame_step"]))
    val_index = data.label_index(labels, val_split) if shardio.list_shards(shards, val_split) else None
    return train_index, val_index


def train_loader(shards, split: str, settings: dict, index: data.LabelIndex, epoch: int,
                 position: data.DataPosition | None, pin_memory: bool):
    """The training stream of ``epoch``, continuing from ``position`` (batches already consumed)."""
    return data.make_loader(
        shards, split, batch_size=int(settings["batch_size"]),
        input_size=int(settings["input_size"]), train=True, augment=settings["augment"],
        seed=int(settings["seed"]), epoch=epoch, bootstrap=bool(settings["bootstrap"]),
        workers=int(settings["workers"]), position=position, index=index, pin_memory=pin_memory, borrow=True,
        class_balance=bool(settings["class_balance"]),
    )


# --------------------------------------------------------------------------------------------
# model, optimiser, schedule


def make_optimizer(params, settings: dict) -> torch.optim.Optimizer:
    """Adam or AdamW; the fused implementation (one kernel over all parameters, CPU and CUDA) is
    several times faster than the default for DAN's ~20 M parameters on the CPU."""
    name = settings["optimizer"]
    if name not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}; valid: adam, adamw")
    opt_cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return opt_cls(params, lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"]), fused=True)


def build(settings: dict, device: torch.device):
    from .losses import DANLoss
    from .model import build_model

    model = build_model(settings)
    criterion = DANLoss(
        task=settings["task"], focal_gamma=float(settings["focal_gamma"]),
        class_weights=settings["class_weights"], loss_weights=settings["loss_weights"],
    )
    model.to(device)
    criterion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed input size; GPU runs are not bit-exact anyway
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    optimizer = make_optimizer(params, settings)
    schedule = settings["schedule"]
    if schedule == "exponential":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(settings["lr_gamma"]))
    elif schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(settings["epochs"]))
    elif schedule == "constant":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=1.0)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; valid: exponential, cosine, constant")
    # bf16 autocast needs no loss scaling; the scaler is kept (disabled) so that checkpoints have
    # one layout whatever the precision.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return model, criterion, optimizer, scheduler, scaler


# --------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py(x):
    return x.item() if hasattr(x, "item") else x


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically: a kill leaves the previous checkpoint or the new one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def checkpoint_state(settings, model, criterion, optimizer, scheduler, scaler, epoch, step,
                     global_step, position: data.DataPosition, sums: dict, history: list) -> dict:
    """Everything a resumed run needs. Loadable with ``torch.load(weights_only=True)``.

    ``epoch``: the epoch in progress (== epochs when training is done); ``step``: optimiser steps
    done in it; ``data``: batches consumed per loader worker (the exact stream position);
    ``sums``: running loss sums of the epoch; ``history``: finished epochs' rows.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "settings": settings,
        "model": model.state_dict(),
        "criterion": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "data": position.state_dict(),
        "sums": dict(sums),
        "history": list(history),
    }


# --------------------------------------------------------------------------------------------
# one epoch


class Trainer:
    """The state of a run: model, optimiser, position in the data, history."""

    def __init__(self, args, settings: dict, device: torch.device):
        self.args, self.settings, self.device = args, settings, device
        self.out = Path(args.out)
        self.ckpt_path = self.out / "last.pt"
        self.train_index, self.val_index = load_data(args.shards, settings, args.train_split, args.val_split)
        seed = int(settings["seed"])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.model, self.criterion, self.optimizer, self.scheduler, self.scaler = build(settings, device)
        self.params = [g for group in self.optimizer.param_groups for g in group["params"]]
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.position = data.DataPosition.start(0, int(settings["workers"]))
        self.sums: dict[str, float] = {}
        self.history: list[dict] = []

    # --- checkpoints

    def save(self) -> None:
        save_checkpoint(self.ckpt_path, checkpoint_state(
            self.settings, self.model, self.criterion, self.optimizer, self.scheduler, self.scaler,
            self.epoch, self.step, self.global_step, self.position, self.sums, self.history))

    def resume(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ckpt_path}: unknown checkpoint format {ckpt.get('format')!r}")
        if ckpt["settings"] != self.settings:
            changed = sorted(k for k in set(ckpt["settings"]) | set(self.settings)
                             if ckpt["settings"].get(k) != self.settings.get(k))
            raise ValueError(f"{self.ckpt_path} was written with other settings (differing: {changed}); "
                             "use --no-resume to start over")
        self.model.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.step, self.global_step = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["global_step"])
        self.position = data.DataPosition.from_state(ckpt["data"])
        self.sums = dict(ckpt["sums"])
        self.history = list(ckpt["history"])
        log.info("resumed from %s: epoch %d, step %d (global step %d)", self.ckpt_path,
                 self.epoch, self.step, self.global_step)
        return True

    # --- training

    def train_one_epoch(self) -> dict:
        s, device = self.settings, self.device
        every = int(s["checkpoint_every"])
        if self.position.epoch != self.epoch:
            self.position = data.DataPosition.start(self.epoch, int(s["workers"]))
        loader, stream = train_loader(self.args.shards, self.args.train_split, s, self.train_index, self.epoch,
                                      self.position, device.type == "cuda")
        total = sum(stream.batches_per_worker())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model.train()
        self.criterion.train()
        bar = tqdm(total=total, initial=sum(self.position.batches), desc=f"epoch {self.epoch + 1}/{s['epochs']}",
                   file=sys.stderr, disable=not _progress_enabled(self.args.progress), unit="batch",
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        for batch in loader:
            n = batch["image"].shape[0]
            if n >= 2:  # training-mode BatchNorm1d needs two samples; a lone last sample is skipped
                parts = self.train_step(batch)
                self.step += 1
                self.global_step += 1
                for k in LOSS_PARTS:
                    self.sums[k] = self.sums.get(k, 0.0) + parts[k] * n
                self.sums["samples"] = self.sums.get("samples", 0.0) + n
            now = time.perf_counter()
            self.sums["seconds"] = self.sums.get("seconds", 0.0) + (now - t_last)
            t_last = now
            self.position.advance(batch["worker"])
            bar.update(1)
            if n >= 2:
                rate = self.sums["samples"] / max(self.sums["seconds"], 1e-9)
                bar.set_postfix(loss=f"{parts['total']:.4f}", img_s=f"{rate:.0f}")
            if every and n >= 2 and self.global_step % every == 0:
                self.save()
        bar.close()
        samples = self.sums.get("samples", 0.0)
        row = {f"loss_{k}": self.sums.get(k, 0.0) / samples if samples else math.nan for k in LOSS_PARTS}
        row["train_samples"] = int(samples)
        row["train_img_per_s"] = samples / self.sums["seconds"] if self.sums.get("seconds") else math.nan
        if device.type == "cuda":
            row["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return row

    def train_step(self, batch: dict) -> dict[str, float]:
        images = to_device(batch["image"], self.device)
        expr = batch["expr"].to(self.device, non_blocking=True)
        va = batch["va"].to(self.device, non_blocking=True)
        weight = batch["weight"].to(self.device, non_blocking=True) if self.settings["class_balance"] else None
        with autocast(self.device):
            out = self.model(images)
            loss, parts = self.criterion(out, expr, va, sample_weight=weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, float(self.settings["grad_clip"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return parts

    # --- the run

    def run(self) -> None:
        s = self.settings
        epochs = int(s["epochs"])
        while self.epoch < epochs:
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": self.epoch + 1, "lr": lr, **self.train_one_epoch()}
            if self.val_index is not None:
                row.update(evaluate(self.model, self.args.shards, self.args.val_split, self.val_index,
                                    s, self.device))
            log.info("epoch %d/%d: %s", self.epoch + 1, epochs,
                     ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "epoch"))
            self.history.append(row)
            self.scheduler.step()
            self.epoch += 1
            self.step = 0
            self.sums = {}
            self.position = data.DataPosition.start(self.epoch, int(s["workers"]))
            self.save()
        write_outputs(self.out, self.model, s, self.history)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _progress_enabled(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate(model, shards, split: str, index: data.LabelIndex, settings: dict, device) -> dict:
    """Expression macro F1 and valence/arousal CCC on every sample of ``split``."""
    loader, _ = data.make_loader(
        shards, split, batch_size=max(int(settings["batch_size"]), 2), input_size=int(settings["input_size"]),
        train=False, workers=int(settings["workers"]), index=index, pin_memory=device.type == "cuda", borrow=True,
    )
    keys, probs, va = infer(model, loader, device)
    rows = np.array([index.rows[k] for k in keys], dtype=np.int64)
    return score(probs, va, index.expr[rows], index.va[rows], settings["task"])


def score(probs: np.ndarray, va: np.ndarray, expr_true: np.ndarray, va_true: np.ndarray, task: str) -> dict:
    out = {"val_expr_f1": math.nan, "val_valence_ccc": math.nan, "val_arousal_ccc": math.nan,
           "val_va_ccc_mean": math.nan}
    if task in ("expr", "both"):
        has = expr_true >= 0
        if has.any():
            out["val_expr_f1"] = metrics.macro_f1(expr_true[has], probs[has].argmax(1))
    if task in ("va", "both"):
        has = np.isfinite(va_true).all(axis=1)
        if has.any():
            out["val_valence_ccc"] = metrics.ccc(va[has, 0], va_true[has, 0])
            out["val_arousal_ccc"] = metrics.ccc(va[has, 1], va_true[has, 1])
            out["val_va_ccc_mean"] = (out["val_valence_ccc"] + out["val_arousal_ccc"]) / 2
    return out


# --------------------------------------------------------------------------------------------
# outputs


def write_outputs(out: Path, model, settings: dict, history: list[dict]) -> None:
    final = {
        "model_state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "settings": settings,
        "model_config": dict(model.config),
        "epoch": int(settings["epochs"]),
    }
    with atomic_path(out / "model.pt") as tmp:
        torch.save(final, tmp)
    write_history(out / "history.csv", history)
    plot_curves(out / "curves.png", history, settings.get("name", ""))
    log.info("wrote %s, history.csv, curves.png", out / "model.pt")


def write_history(path: Path, history: list[dict]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    for part in LOSS_PARTS:
        ys = [r.get(f"loss_{part}", math.nan) for r in history]
        if any(y for y in ys if not math.isnan(y)):
            ax_loss.plot(epochs, ys, marker="o", label=part)
    ax_loss.set(xlabel="epoch", ylabel="mean loss per training sample", title=f"{title} loss".strip())
    ax_loss.legend(fontsize="small")
    for col, label in (("val_expr_f1", "expression macro F1"), ("val_va_ccc_mean", "VA mean CCC")):
        ys = [r.get(col, math.nan) for r in history]
        if any(not math.isnan(y) for y in ys):
            ax_val.plot(epochs, ys, marker="o", label=label)
    ax_val.set(xlabel="epoch", ylabel="validation score", title="validation")
    if ax_val.lines:
        ax_val.legend(fontsize="small")
    else:
        ax_val.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax_val.transAxes)
    for ax in (ax_loss, ax_val):  # epochs are whole numbers: no 0.25-epoch ticks
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(min(epochs, default=1) - 0.5, max(epochs, default=1) + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    require_inputs("python -m ferflow.train", [("--shards", args.shards, "dir"),
                                               ("--shards", Path(args.shards) / "labels.parquet", "file")])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = resolve_settings(read_settings(args.settings))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with devices.select_device(args.device, args.lock_dir) as device:
        trainer = Trainer(args, settings, device)
        if args.resume:
            trainer.resume()
        elif trainer.ckpt_path.exists():
            trainer.ckpt_path.unlink()
        log.info("training %s on %s: %d training samples%s", settings["name"], device, len(trainer.train_index),
                 f", {len(trainer.val_index)} validation samples" if trainer.val_index is not None else "")
        trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
