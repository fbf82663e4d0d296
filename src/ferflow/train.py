"""Train one variant of the extended DAN.

    python -m ferflow.train --shards results/shards --settings '{"name": "v1", "seed": 1}' \\
        --out results/models/v1 [--device auto|cpu|cuda] [--resume/--no-resume]

``--settings`` is the variant's merged settings (the ``train_settings`` keys of
``workflow/schemas/config.schema.yaml`` plus ``name`` and ``seed``), as a JSON string or a JSON /
YAML file; missing keys take :data:`DEFAULTS`.

Outputs in ``--out``:

- ``last.pt``: the resumable checkpoint (see :func:`save_checkpoint`), written atomically at every
  epoch end and every ``checkpoint_every`` optimiser steps, and removed once ``model.pt`` is
  written (it exists only while a run is incomplete). A job killed at any moment and started
  again (``--resume`` is the default) continues from it and, on the CPU, ends with exactly the
  weights of an uninterrupted run of the same seed. A finished run started again does nothing.
- ``model.pt``: the final weights for prediction: ``{"model_state_dict", "settings",
  "model_config", "epoch"}``, tensors and primitives only (``torch.load(weights_only=True)``).
- ``history.csv`` and ``curves.png``: per-epoch learning rate, loss parts, training images/s,
  micro-batch, ranks, peak memory and, when the shards have a validation split, its expression
  macro F1 and mean VA CCC.
- ``steps.csv``: a row every ``--loss-every`` optimiser steps (default: every step; an epoch's last
  row may hold fewer): ``global_step`` (the row's last step), ``epoch``, ``steps`` and ``samples``
  in the row, each loss part's mean per training sample over those steps, ``lr`` and ``img_per_s``.
  The rows travel in the checkpoint, so a resumed run writes those of an uninterrupted one (all but
  ``img_per_s``). ``curves.png`` plots them under the per-epoch curves.

``batch_size`` is the optimisation batch, fed in micro-batches of ``micro_batch`` (auto: the
memory plan, :func:`plan_micro_batch`) with gradients accumulated to one optimiser step. Under
``torchrun`` (``gpus_per_variant`` > 1 in the workflow) each rank trains on its part of every
batch with DistributedDataParallel; rank 0 writes the files. See docs/running.md.

Read top to bottom: get_args_parser, load_data, build, checkpoints, memory plan, Trainer, evaluate, main.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import io
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import data, devices, metrics, shardio
from .atomic import atomic_path, write_text
from .inputcheck import fail, json_problem, prog_of, require_inputs
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
    "micro_batch": "auto",
    "gpus_per_variant": 1,
}
#: Keys a variant may carry that training does not use.
IGNORED_KEYS = ("weight",)
LOSS_PARTS = ("total", "expr", "va", "affinity", "partition")
#: Settings that only say how a run is spread over devices: a run may resume with them changed.
LAYOUT_KEYS = ("micro_batch", "gpus_per_variant")
#: Caps the memory the plan may use, in GiB (default: the device's free memory).
ENV_MEMORY = "FERFLOW_DEVICE_MEMORY_GIB"
#: Where ``micro_batch: auto`` caches its GPU probes (default: ~/.cache/ferflow).
ENV_CACHE = "FERFLOW_CACHE_DIR"
CHECKPOINT_FORMAT = 1
#: steps.csv's columns, in order (see :meth:`Trainer.step_rows`)
STEP_COLUMNS = ("global_step", "epoch", "steps", "samples", *(f"loss_{k}" for k in LOSS_PARTS), "lr", "img_per_s")


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
    """A JSON string, or the path of a JSON or YAML file. Raises ValueError naming the file (if
    any), the line and column of bad JSON or YAML, or a value that is not a mapping."""
    path = Path(text)
    where = ""
    if not text.lstrip().startswith("{") and path.is_file():
        where = f"{path}: "
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                value = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{where}not valid YAML ({' '.join(str(exc).split())})") from None
            text = None
    if text is not None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}{json_problem(exc)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}a mapping of settings is expected, not {type(value).__name__}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_of("train"), description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="shard folder (holds <split>/ and labels.parquet)")
    p.add_argument("--settings", default="{}", help="variant settings: JSON string or JSON/YAML file")
    p.add_argument("--out", required=True, help="output folder (last.pt, model.pt, history.csv, steps.csv, curves.png)")
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
    p.add_argument("--log-every", type=int, default=50,
                   help="without a progress bar, log loss, img/s and the epoch's ETA every N steps (0: never)")
    p.add_argument("--loss-every", type=int, default=1,
                   help="a row of steps.csv (the mean loss parts, lr and img/s of those steps) every N "
                   "optimiser steps (default: 1, every step)")
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
                 position: data.DataPosition | None, pin_memory: bool, rank: int = 0, world: int = 1):
    """The training stream of ``epoch``, continuing from ``position`` (batches already consumed)."""
    return data.make_loader(
        shards, split, batch_size=int(settings["batch_size"]),
        input_size=int(settings["input_size"]), train=True, augment=settings["augment"],
        seed=int(settings["seed"]), epoch=epoch, bootstrap=bool(settings["bootstrap"]),
        workers=int(settings["workers"]), position=position, index=index, pin_memory=pin_memory, borrow=True,
        class_balance=bool(settings["class_balance"]), rank=rank, world=world,
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


def rng_state(device: torch.device) -> dict:
    """Python, numpy and torch CPU generator states, and the training device's CUDA generator.

    Only ``device``'s CUDA state is kept (``torch.cuda.get_rng_state(device)``), not one per
    visible GPU: a run resumed with fewer visible GPUs must still be able to restore it.
    """
    np_state = np.random.get_state()
    state = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`'s generators; the CUDA state goes to ``device`` (when it is a GPU).

    Checkpoints of format 1 before this fix hold a list (one state per GPU then visible); the
    training device was always the first of them.
    """
    random.setstate(_lists_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda, device)


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
                     global_step, position: data.DataPosition, sums: dict, history: list,
                     device: torch.device, steps: list | None = None, steps_open: dict | None = None) -> dict:
    """Everything a resumed run needs. Loadable with ``torch.load(weights_only=True)``.

    ``epoch``: the epoch in progress (== epochs when training is done); ``step``: optimiser steps
    done in it; ``data``: batches consumed per loader worker (the exact stream position);
    ``sums``: running loss sums of the epoch; ``history``: finished epochs' rows; ``steps``: the
    rows of steps.csv so far, ``steps_open``: the sums of the row in progress (steps, samples,
    seconds, loss parts). A checkpoint without the last two (older runs) resumes with no step rows.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "settings": settings,
        "model": model.state_dict(),
        "criterion": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(device),
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "data": position.state_dict(),
        "sums": dict(sums),
        "history": list(history),
        "steps": list(steps or []),
        "steps_open": dict(steps_open or {}),
    }


# --------------------------------------------------------------------------------------------
# memory plan


class MemoryPlanError(RuntimeError):
    """Not even the smallest micro-batch fits the device."""


#: Peak memory of a training step over the sum of the leaf modules' forward outputs: autograd
#: keeps most of those for backward, and backward adds the gradient of the largest ones.
ACTIVATION_FACTOR = 1.5
MIN_MICRO_BATCH = 2  # training-mode BatchNorm1d needs two samples


def available_memory(device: torch.device) -> tuple[float, str]:
    """Bytes the run may use on ``device`` and where the number comes from: ``$FERFLOW_DEVICE_MEMORY_GIB``
    if set, else the GPU's free memory (``torch.cuda.mem_get_info``), else ``MemAvailable`` of
    ``/proc/meminfo`` (the CPU)."""
    env = os.environ.get(ENV_MEMORY)
    if env:
        return float(env) * 2**30, ENV_MEMORY
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0]), "free GPU memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")), "free pages"


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak memory so far: CUDA's allocator peak on a GPU, else the peak resident
    set size (``ru_maxrss``), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def estimate_step_bytes(model: nn.Module, criterion: nn.Module, input_size: int, device: torch.device) -> tuple[float, float]:
    """(fixed, per_sample) bytes of a training step: parameters with their gradients and Adam's
    two moments (4 float32 copies), and per sample :data:`ACTIVATION_FACTOR` x the bytes of every
    leaf module's forward output (measured on a 2-image forward in eval mode, under the run's
    autocast; no state changes)."""
    params = list(model.parameters()) + list(criterion.parameters())
    fixed = 4.0 * sum(p.numel() * p.element_size() for p in params)
    total = [0]

    def hook(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, input_size, input_size), dtype=torch.uint8, generator=gen)
    try:
        model.eval()
        with torch.no_grad(), autocast(device):
            model(to_device(images, device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    per_sample = ACTIVATION_FACTOR * total[0] / 2 + 3 * input_size**2
    return fixed, per_sample


def _probe_fits(model, criterion, settings, device, m: int) -> float | None:
    """Peak GiB of a real forward/backward of ``m`` samples on a GPU, or None on out-of-memory.
    BatchNorm buffers and gradients are put back as they were."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    size = int(settings["input_size"])
    gen = torch.Generator().manual_seed(0)
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        images = to_device(torch.randint(0, 256, (m, 3, size, size), dtype=torch.uint8, generator=gen), device)
        expr = torch.zeros(m, dtype=torch.long, device=device)
        va = torch.zeros(m, 2, device=device)
        with autocast(device):
            loss, _ = criterion(model(images), expr, va)
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        for p in list(model.parameters()) + list(criterion.parameters()):
            p.grad = None
        model.load_state_dict(buffers, strict=False)
        torch.cuda.empty_cache()


def _cache_path() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "ferflow") / "micro_batch.json"


def plan_micro_batch(model, criterion, settings: dict, device: torch.device, batch: int) -> dict:
    """The micro-batch for a (per-rank) batch of ``batch`` samples, and the memory plan behind it.

    ``settings["micro_batch"]``: a number (capped at ``batch``), or ``"auto"``: the largest that
    the estimate (:func:`estimate_step_bytes`) fits into 90% of :func:`available_memory`; on a
    GPU then confirmed by a real step, halved while it runs out of memory, and cached per device
    name, backbone, heads and input size in ``$FERFLOW_CACHE_DIR/micro_batch.json``.
    Returns ``{"micro_batch", "estimated_gib", "available_gib", "device_name", "source"}``.
    Raises :class:`MemoryPlanError` when a micro-batch of 2 is estimated (or, on a GPU, found)
    not to fit.
    """
    fixed, per_sample = estimate_step_bytes(model, criterion, int(settings["input_size"]), device)
    avail, source = available_memory(device)
    name = device_name(device)
    budget = 0.9 * avail
    need_min = fixed + MIN_MICRO_BATCH * per_sample
    what = f"{settings['backbone']} with {settings['heads']} heads at {settings['input_size']} px"
    if need_min > budget:
        raise MemoryPlanError(
            f"memory plan: a micro-batch of {MIN_MICRO_BATCH} of {what} needs about {need_min / 2**30:.2f} GiB, "
            f"{name} has {avail / 2**30:.2f} GiB ({source}): nothing fits; use a smaller input_size or "
            f"backbone, or a device with more memory")
    requested = settings["micro_batch"]
    if requested != "auto":
        micro = max(MIN_MICRO_BATCH, min(int(requested), batch))
        if fixed + micro * per_sample > budget:
            log.warning("memory plan: micro_batch %d is estimated at %.2f GiB, more than the %.2f GiB available "
                        "(%s); micro_batch: auto would choose a smaller one", micro,
                        (fixed + micro * per_sample) / 2**30, avail / 2**30, source)
        how = "set by micro_batch"
    else:
        micro = int(max(MIN_MICRO_BATCH, min(batch, (budget - fixed) // per_sample)))
        how = "estimated"
        if device.type == "cuda":
            micro, how = _confirm_on_gpu(model, criterion, settings, device, micro, name)
    return {"micro_batch": micro, "estimated_gib": (fixed + micro * per_sample) / 2**30,
            "available_gib": avail / 2**30, "device_name": name, "source": f"{source}; micro-batch {how}"}


def _confirm_on_gpu(model, criterion, settings, device, micro: int, name: str) -> tuple[int, str]:
    key = f"{name}|{settings['backbone']}|{settings['heads']}|{settings['input_size']}|bf16"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache and int(cache[key]) >= MIN_MICRO_BATCH:
        return min(micro, int(cache[key])), f"probed before, cached in {path}"
    m = micro
    while m >= MIN_MICRO_BATCH:
        peak = _probe_fits(model, criterion, settings, device, m)
        if peak is not None:
            break
        log.info("memory plan: micro-batch %d ran out of memory on %s; trying %d", m, name, m // 2)
        m //= 2
    else:
        raise MemoryPlanError(f"memory plan: a micro-batch of {MIN_MICRO_BATCH} of {settings['backbone']} at "
                              f"{settings['input_size']} px runs out of memory on {name}")
    cache[key] = m
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return m, f"probed (peak {peak:.2f} GiB), cached in {path}"


# --------------------------------------------------------------------------------------------
# one epoch


class _Step(nn.Module):
    """Model and loss as one module, so that DistributedDataParallel averages the gradients of
    both (the loss has parameters: the affinity centers). ``forward`` returns the loss of one
    micro-batch and its logged parts stacked as (5,) in :data:`LOSS_PARTS` order."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images, expr, va, weight, totals):
        out = self.model(images)
        loss, parts = self.criterion(out, expr, va, sample_weight=weight, batch_totals=totals)
        return loss, torch.stack([parts[k] for k in LOSS_PARTS])


def micro_slices(n: int, micro: int) -> list[tuple[int, int]]:
    """(start, stop) of the micro-batches of a batch of ``n``: ``micro`` samples each, the last
    one the rest, merged into the one before when it would hold a single sample (training-mode
    BatchNorm1d needs two)."""
    bounds = list(range(0, n, micro)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


class Trainer:
    """The state of a run: model, optimiser, position in the data, history.

    With ``torch.distributed`` initialised (``torchrun``), every rank holds the same model; each
    batch the loader yields is the global batch, of which rank r trains on :func:`rank_slice`
    (so a k-rank run sees exactly the samples of a one-process run); only rank 0 writes files.
    """

    def __init__(self, args, settings: dict, device: torch.device):
        self.args, self.settings, self.device = args, settings, device
        self.out = Path(args.out)
        self.ckpt_path = self.out / "last.pt"
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.train_index, self.val_index = load_data(args.shards, settings, args.train_split, args.val_split)
        seed = int(settings["seed"])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.model, self.criterion, self.optimizer, self.scheduler, self.scaler = build(settings, device)
        self.params = [g for group in self.optimizer.param_groups for g in group["params"]]
        self.step_module: nn.Module = _Step(self.model, self.criterion)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # unused parameters (the VA head of an expression-only variant) keep no gradient
            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=True)
        self.micro = int(settings["batch_size"])  # set by plan_memory() before training
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.position = data.DataPosition.start(0, int(settings["workers"]))
        self.sums: dict[str, float] = {}
        self.history: list[dict] = []
        self.steps: list[dict] = []  # steps.csv rows; loss parts still on the device until step_rows()
        self.loss_every = int(getattr(args, "loss_every", 1) or 1)
        self._open_row()

    # --- checkpoints

    def save(self) -> None:
        if self.rank != 0:
            return
        save_checkpoint(self.ckpt_path, checkpoint_state(
            self.settings, self.model, self.criterion, self.optimizer, self.scheduler, self.scaler,
            self.epoch, self.step, self.global_step, self.position, self._sums_now(), self.history, self.device,
            self.step_rows(), self._open_state()))

    def resume(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ckpt_path}: unknown checkpoint format {ckpt.get('format')!r}")
        check_same_settings(self.ckpt_path, ckpt["settings"], self.settings)
        self.model.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.device)
        self.epoch, self.step, self.global_step = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["global_step"])
        self.position = data.DataPosition.from_state(ckpt["data"])
        self.sums = dict(ckpt["sums"])
        self.history = list(ckpt["history"])
        self.steps = [dict(r) for r in ckpt.get("steps", [])]
        self._open_row(ckpt.get("steps_open") or None)
        log.info("resumed from %s: epoch %d, step %d (global step %d)", self.ckpt_path,
                 self.epoch, self.step, self.global_step)
        return True

    # --- memory plan

    def plan_memory(self) -> None:
        """Choose the micro-batch (``micro_batch``: auto or a number) and log the plan; raise
        :class:`MemoryPlanError` at once when not even a micro-batch of 2 fits."""
        s = self.settings
        local = data.rank_slice(int(s["batch_size"]), 0, self.world)[1]
        plan = plan_micro_batch(self.model, self.criterion, s, self.device, local)
        self.micro = plan["micro_batch"]
        self.plan = plan
        steps = math.ceil(local / self.micro)
        log.info("memory plan: batch %d%s in %d micro-batch(es) of %d (%d accumulation steps per optimiser "
                 "step); estimated peak %.2f GiB of %.2f GiB available on %s%s",
                 int(s["batch_size"]), f" = {self.world} ranks x {local}" if self.world > 1 else "", steps,
                 self.micro, steps, plan["estimated_gib"], plan["available_gib"], plan["device_name"],
                 f" ({plan['source']})" if plan.get("source") else "")
        if steps > 1 or self.world > 1:
            log.info("note: BatchNorm statistics, the CCC and the partition loss are computed per micro-batch "
                     "of %d, not over the batch of %d (the focal and affinity losses are exact per-sample means "
                     "of the whole batch)", self.micro, int(s["batch_size"]))

    # --- training

    def train_one_epoch(self) -> dict:
        s, device = self.settings, self.device
        every = int(s["checkpoint_every"])
        if self.position.epoch != self.epoch:
            self.position = data.DataPosition.start(self.epoch, int(s["workers"]))
        loader, stream = train_loader(self.args.shards, self.args.train_split, s, self.train_index, self.epoch,
                                      self.position, device.type == "cuda", self.rank, self.world)
        total = sum(stream.batches_per_worker())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model.train()
        self.criterion.train()
        show_bar = _progress_enabled(self.args.progress) and self.rank == 0
        bar = tqdm(total=total, initial=sum(self.position.batches), desc=f"epoch {self.epoch + 1}/{s['epochs']}",
                   file=sys.stderr, disable=not show_bar, unit="batch", dynamic_ncols=True)
        log_every = 0 if show_bar or self.rank != 0 else int(self.args.log_every)
        loss_sum = torch.tensor([self.sums.get(k, 0.0) for k in LOSS_PARTS], dtype=torch.float64, device=device)
        self._loss_sum = loss_sum
        t_last = time.perf_counter()
        first = self.global_step == 0
        for batch in loader:
            n = len(batch["expr"])  # the global batch (with ranks, "image" holds this rank's part)
            if self._trainable(n):
                weighted = self.train_step(batch).double() * n
                loss_sum += weighted
                self._row_parts += weighted
                self._row["steps"] += 1
                self._row["samples"] += n
                self.step += 1
                self.global_step += 1
                self.sums["samples"] = self.sums.get("samples", 0.0) + n
            now = time.perf_counter()
            self.sums["seconds"] = self.sums.get("seconds", 0.0) + (now - t_last)
            self._row["seconds"] += now - t_last
            t_last = now
            if self._row["steps"] >= self.loss_every:
                self._close_row()
            self.position.advance(batch["worker"])
            bar.update(1)
            if not self._trainable(n):
                continue
            if first:
                self._log_first_step(n)
                first = False
            if show_bar and self.step % 10 == 1:
                bar.set_postfix(loss=f"{loss_sum[0].item() / self.sums['samples']:.4f}",
                                img_s=f"{self._rate():.0f}")
            if log_every and self.step % log_every == 0:
                done = sum(self.position.batches)
                eta = self.sums["seconds"] / done * (total - done)
                log.info("epoch %d/%s step %d/%d: loss %.4f, %.0f img/s, epoch ETA %s", self.epoch + 1, s["epochs"],
                         done, total, loss_sum[0].item() / self.sums["samples"], self._rate(), _hms(eta))
            if every and self.global_step % every == 0:
                self.save()
        bar.close()
        if self._row["steps"]:  # rows never span two epochs
            self._close_row()
        sums = self.sums = self._sums_now()
        samples = sums.get("samples", 0.0)
        row = {f"loss_{k}": sums.get(k, 0.0) / samples if samples else math.nan for k in LOSS_PARTS}
        row["train_samples"] = int(samples)
        row["train_img_per_s"] = samples / sums["seconds"] if sums.get("seconds") else math.nan
        row["micro_batch"] = self.micro
        row["ranks"] = self.world
        row["peak_mem_gib"] = peak_memory_gib(device)
        self._loss_sum = None
        return row

    def _trainable(self, n: int) -> bool:
        # training-mode BatchNorm1d needs two samples: a batch whose rank slices would hold fewer
        # is skipped, by every rank alike (they all know n)
        return min(b - a for a, b in (data.rank_slice(n, r, self.world) for r in range(self.world))) >= 2

    def _rate(self) -> float:
        return self.sums.get("samples", 0.0) / max(self.sums.get("seconds", 0.0), 1e-9)

    def _sums_now(self) -> dict:
        """The epoch's running sums, the loss parts read from the device (one sync)."""
        sums = dict(self.sums)
        if getattr(self, "_loss_sum", None) is not None:
            sums.update(zip(LOSS_PARTS, self._loss_sum.tolist()))
        return sums

    # --- steps.csv rows

    def _open_row(self, state: dict | None = None) -> None:
        """Start a steps.csv row, or continue the one a checkpoint holds (:meth:`_open_state`)."""
        state = state or {}
        self._row = {k: state.get(k, 0) for k in ("steps", "samples", "seconds")}
        parts = state.get("parts") or [0.0] * len(LOSS_PARTS)
        self._row_parts = torch.tensor(parts, dtype=torch.float64, device=self.device)

    def _open_state(self) -> dict:
        return {**self._row, "parts": self._row_parts.tolist()}

    def _close_row(self) -> None:
        """Append the row in progress to ``self.steps``; its loss parts stay on the device (no host
        sync per step) until :meth:`step_rows` reads them all at once."""
        r = self._row
        self.steps.append({"global_step": self.global_step, "epoch": self.epoch + 1, "steps": r["steps"],
                           "samples": int(r["samples"]), "parts": self._row_parts / max(r["samples"], 1),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "img_per_s": r["samples"] / r["seconds"] if r["seconds"] > 0 else math.nan})
        self._open_row()

    def step_rows(self) -> list[dict]:
        """The finished steps.csv rows (columns :data:`STEP_COLUMNS`), host numbers only."""
        pending = [i for i, r in enumerate(self.steps) if "parts" in r]
        if pending:
            values = torch.stack([self.steps[i]["parts"] for i in pending]).tolist()
            for i, v in zip(pending, values):
                row = self.steps[i]
                del row["parts"]
                row.update({f"loss_{k}": x for k, x in zip(LOSS_PARTS, v)})
                self.steps[i] = {c: row[c] for c in STEP_COLUMNS}
        return [dict(r) for r in self.steps]

    def _log_first_step(self, n: int) -> None:
        log.info("first optimiser step done: measured peak memory %.2f GiB on %s (estimated %.2f GiB), "
                 "micro-batch %d, %.0f img/s (includes warm-up)", peak_memory_gib(self.device),
                 self.plan["device_name"], self.plan["estimated_gib"], self.micro, self._rate())

    def train_step(self, batch: dict) -> torch.Tensor:
        """One optimiser step on a (global) batch, in micro-batches; returns the loss parts (5,)
        in :data:`LOSS_PARTS` order as a device tensor (no host sync)."""
        n = len(batch["expr"])
        a, b = data.rank_slice(n, self.rank, self.world)
        use_weight = bool(self.settings["class_balance"])
        totals = self.criterion.weight_totals(batch["expr"], batch["va"], batch["weight"] if use_weight else None)
        totals = totals.to(self.device, non_blocking=True)
        # the loader decodes only this rank's part ("part"); a whole batch is sliced here
        images = batch["image"] if "part" in batch else batch["image"][a:b]
        expr = batch["expr"][a:b].to(self.device, non_blocking=True)
        va = batch["va"][a:b].to(self.device, non_blocking=True)
        weight = batch["weight"][a:b].to(self.device, non_blocking=True) if use_weight else None
        self.optimizer.zero_grad(set_to_none=True)
        chunks = micro_slices(b - a, self.micro)
        parts = torch.zeros(len(LOSS_PARTS), device=self.device)
        for j, (i, k) in enumerate(chunks):
            sync = j == len(chunks) - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.step_module.no_sync():
                with autocast(self.device):
                    loss, p = self.step_module(to_device(images[i:k], self.device), expr[i:k], va[i:k],
                                               None if weight is None else weight[i:k], totals)
                # DistributedDataParallel averages over the ranks; each rank's loss is its share of
                # the global batch's, so the sum is wanted: scale by the world size
                self.scaler.scale(loss * self.world if self.world > 1 else loss).backward()
            parts += p.detach()
        if self.settings["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, float(self.settings["grad_clip"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.world > 1:  # every rank logs the global batch's parts
            dist.all_reduce(parts)
        return parts

    # --- the run

    def run(self) -> None:
        s = self.settings
        epochs = int(s["epochs"])
        while self.epoch < epochs:
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": self.epoch + 1, "lr": lr, **self.train_one_epoch()}
            if self.val_index is not None:
                if self.rank == 0:
                    row.update(evaluate(self.model, self.args.shards, self.args.val_split, self.val_index,
                                        s, self.device))
                if self.world > 1:
                    dist.barrier()
            log.info("epoch %d/%d: %s", self.epoch + 1, epochs,
                     ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "epoch"))
            self.history.append(row)
            self.scheduler.step()
            self.epoch += 1
            self.step = 0
            self.sums = {}
            self.position = data.DataPosition.start(self.epoch, int(s["workers"]))
            self.save()
        if self.rank == 0:
            write_outputs(self.out, self.model, s, self.history, self.step_rows())
            # the run is complete: the resumable checkpoint has done its job (#16)
            self.ckpt_path.unlink(missing_ok=True)
            log.info("removed %s (the run is complete)", self.ckpt_path)


def check_same_settings(path, saved: dict, current: dict) -> None:
    """Refuse to continue a run written with other settings (keys that only change how the run is
    spread over devices, :data:`LAYOUT_KEYS`, may differ)."""
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in LAYOUT_KEYS and saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"{path} was written with other settings (differing: {changed}); "
                         "use --no-resume to start over")


def _hms(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
    rows = index.rows_of(keys)
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


def write_outputs(out: Path, model, settings: dict, history: list[dict], steps: list[dict] | None = None) -> None:
    """model.pt, history.csv, steps.csv and curves.png in ``out``, each written atomically."""
    final = {
        "model_state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "settings": settings,
        "model_config": dict(model.config),
        "epoch": int(settings["epochs"]),
    }
    with atomic_path(out / "model.pt") as tmp:
        torch.save(final, tmp)
    write_history(out / "history.csv", history)
    write_history(out / "steps.csv", steps or [], STEP_COLUMNS)
    plot_curves(out / "curves.png", history, settings.get("name", ""), steps)
    log.info("wrote %s, history.csv, steps.csv, curves.png", out / "model.pt")


def write_history(path: Path, history: list[dict], columns: Sequence[str] = ()) -> None:
    """``history`` as csv (atomically): ``columns`` first, then every other key in order of
    appearance; NaN is an empty field."""
    columns = list(columns)
    for row in history:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict], title: str = "", steps: list[dict] | None = None) -> None:
    """The training curves as PNG (atomically): per epoch (``history``) the mean loss parts and the
    validation scores, integer epoch ticks; with ``steps`` (steps.csv rows) a panel below with the
    loss parts against the global optimiser step, epoch ends marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    if steps:
        fig = plt.figure(figsize=(10, 7.5))
        grid = fig.add_gridspec(2, 2, height_ratios=(1, 1))
        ax_loss, ax_val = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        _plot_steps(fig.add_subplot(grid[1, :]), steps, MaxNLocator)
    else:
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


def _plot_steps(ax, steps: list[dict], locator) -> None:
    """steps.csv rows on ``ax``: each loss part against the global step; a dotted line after each
    epoch's last step."""
    x = [r["global_step"] for r in steps]
    for part in LOSS_PARTS:
        ys = [r.get(f"loss_{part}", math.nan) for r in steps]
        if any(y for y in ys if not math.isnan(y)):
            ax.plot(x, ys, linewidth=1, marker="." if len(x) <= 60 else None, label=part)
    ends = [a["global_step"] for a, b in zip(steps, steps[1:]) if a["epoch"] != b["epoch"]]
    for end in ends:
        ax.axvline(end + 0.5, color="grey", linestyle=":", linewidth=1)
    per = {r["steps"] for r in steps}
    every = f"every {max(per)} steps" if max(per) > 1 else "every step"
    ax.set(xlabel="optimiser step (dotted: end of an epoch)", ylabel="mean loss per training sample",
           title=f"loss {every}")
    ax.xaxis.set_major_locator(locator(integer=True))
    ax.legend(fontsize="small", ncol=len(LOSS_PARTS))


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    prog = prog_of("train")
    require_inputs(prog, [("--shards", args.shards, "dir"), ("--shards", Path(args.shards) / "labels.parquet", "file")])
    if args.loss_every < 1:
        fail(prog, f"--loss-every {args.loss_every}: must be at least 1")
    try:
        settings = resolve_settings(read_settings(args.settings))
    except (ValueError, OSError) as exc:  # bad JSON / YAML, unknown keys, an unreadable file
        fail(prog, f"--settings: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and is_complete(out, settings):
        log.info("%s is complete (model.pt, history.csv, steps.csv and curves.png of these settings); nothing to do", out)
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("LOCAL_RANK") is not None:
        die_with_parent()
    if world != int(settings["gpus_per_variant"]):
        log.warning("%d process(es) for gpus_per_variant %s (the workflow launches gpus_per_variant ranks "
                    "with torchrun; the batch is split over the ranks there are)", world, settings["gpus_per_variant"])
    with devices.select_device(args.device, args.lock_dir) as device:
        if world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=6))  # rank 0 evaluates meanwhile
        try:
            trainer = Trainer(args, settings, device)
            if not args.resume and trainer.rank == 0 and trainer.ckpt_path.exists():
                trainer.ckpt_path.unlink()
            if world > 1:
                dist.barrier()
            if args.resume:
                trainer.resume()
            log.info("training %s on %s%s: %d training samples%s", settings["name"], device,
                     f" (rank {trainer.rank} of {world})" if world > 1 else "", len(trainer.train_index),
                     f", {len(trainer.val_index)} validation samples" if trainer.val_index is not None else "")
            trainer.plan_memory()
            trainer.run()
        finally:
            if world > 1 and dist.is_initialized():
                dist.destroy_process_group()
    return 0


def die_with_parent() -> None:
    """Under torchrun: be killed (SIGKILL) when the launcher dies. torchrun starts each rank in a
    session of its own, so a job killed by its process group (Snakemake, kill -9 of the run)
    would otherwise leave the ranks training, on GPUs whose claim died with the launcher.
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


def is_complete(out: Path, settings: dict) -> bool:
    """True when ``out`` holds a finished run's outputs for ``settings`` (and no checkpoint: a
    complete run removes it). Raises ValueError when they were written with other settings."""
    if (out / "last.pt").exists() or not all((out / f).is_file() for f in ("model.pt", "history.csv", "steps.csv", "curves.png")):
        return False
    saved = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    check_same_settings(out / "model.pt", saved.get("settings", {}), settings)
    return True

if __name__ == "__main__":
    sys.exit(main())
