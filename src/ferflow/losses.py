"""Losses of the extended DAN, and :class:`DANLoss`, the one place where they are combined.

All losses compute in float32 (they cast bf16 autocast outputs up) and handle missing labels by
per-sample weights rather than boolean indexing, so they never synchronise with the GPU and never
break the autograd graph: a sample without the label has weight 0, and a batch where no sample
carries the label gives exactly 0 for that loss (still attached to the graph).

``sample_weight`` (B,) is a per-sample multiplicity, e.g. the Poisson(1) bootstrap weights of
bagging: an integer weight w behaves like the sample repeated w times (weighted means for focal
and affinity, weighted population statistics for CCC).

Formulas (``docs/method.md``, DAN's code):

- focal: ``FL_i = -w[y_i] (1 - p_{i,y_i})^gamma log p_{i,y_i}``, weighted mean over the labelled
  samples (class weights ``w`` multiply the per-sample loss; they do not renormalise the mean, so
  with gamma 0 this is ``F.cross_entropy(..., weight=w, reduction="none").mean()``).
- CCC: ``1 - CCC`` per column (valence, arousal) with population statistics, averaged over the
  columns -- not over the flattened (B, 2) tensor as in the team's code. ``CCC = 2 cov /
  (var_x + var_y + (mean_x - mean_y)^2 + eps)``: constant predictions give CCC 0, never NaN.
- affinity (DAN): ``sum_i ||x_i - c_{y_i}||^2 / sum_d var_k(c_{k,d})``, each term clamped to
  [1e-12, 1e12], divided by the batch size (weighted: by the summed weight). ``var_k`` is the
  unbiased variance over the class centers (torch's default, as in DAN). DAN clamps the whole
  masked B x C distance matrix, which adds (C-1) * 1e-12 per sample; we leave that constant out.
- partition (DAN): ``log(1 + N / (mean over channels and samples of var_heads + eps))`` with the
  unbiased variance across the N heads (DAN's ``x.var(dim=1).mean()``); exactly 0 when N == 1.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .labels import NUM_EXPRESSIONS

TASKS = ("expr", "va", "both")
LOSS_KEYS = ("expr", "va", "affinity", "partition")
CCC_EPS = 1e-8
PARTITION_EPS = 1e-8
_DIV_EPS = 1e-12


def _weights(n: int, sample_weight: Tensor | None, valid: Tensor, device) -> Tensor:
    w = valid.to(torch.float32)
    if sample_weight is not None:
        sample_weight = torch.as_tensor(sample_weight, device=device, dtype=torch.float32)
        if sample_weight.shape != (n,):
            raise ValueError(f"sample_weight must have shape ({n},), got {tuple(sample_weight.shape)}")
        w = w * sample_weight
    return w


def _weighted_mean(values: Tensor, w: Tensor) -> Tensor:
    """sum(w * v) / sum(w); exactly 0 (with a valid graph) when sum(w) == 0."""
    total = w.sum()
    return (w * values).sum() / total.clamp_min(_DIV_EPS) * (total > 0)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    weight: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Focal loss (Lin et al.) over (B, C) logits and (B,) integer targets.

    Mean over the samples (weighted mean with ``sample_weight``); targets < 0 mean "no label" and
    are left out. ``weight`` (C,) are class weights multiplying each sample's loss.
    """
    logits = logits.float()
    target = torch.as_tensor(target, device=logits.device).long()
    valid = target >= 0
    safe = target.clamp_min(0)
    logp = F.log_softmax(logits, dim=1).gather(1, safe[:, None]).squeeze(1)
    loss = -logp
    if gamma:
        p = logp.exp()
        loss = loss * (1.0 - p).clamp_min(0).pow(gamma)
    if weight is not None:
        weight = torch.as_tensor(weight, device=logits.device, dtype=torch.float32)
        loss = loss * weight[safe]
    w = _weights(len(target), sample_weight, valid, logits.device)
    return _weighted_mean(loss, w)


def ccc_per_column(pred: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """CCC of each column of (B, D) predictions vs targets; NaN targets are left out per column.
    Weighted population statistics; a column without any label gives CCC 0."""
    pred = pred.float()
    target = torch.as_tensor(target, device=pred.device).float()
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred and target must both be (B, D); got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}")
    valid = torch.isfinite(target)
    w = valid.float()
    if sample_weight is not None:
        sw = torch.as_tensor(sample_weight, device=pred.device, dtype=torch.float32)
        if sw.shape != (pred.shape[0],):
            raise ValueError(f"sample_weight must have shape ({pred.shape[0]},)")
        w = w * sw[:, None]
    y = torch.where(valid, target, torch.zeros_like(target))
    x = torch.where(valid, pred, torch.zeros_like(pred))  # keeps NaN out of unused rows' grads
    wsum = w.sum(dim=0).clamp_min(_DIV_EPS)
    mx = (w * x).sum(0) / wsum
    my = (w * y).sum(0) / wsum
    dx, dy = x - mx, y - my
    vx = (w * dx * dx).sum(0) / wsum
    vy = (w * dy * dy).sum(0) / wsum
    cov = (w * dx * dy).sum(0) / wsum
    return 2.0 * cov / (vx + vy + (mx - my) ** 2 + CCC_EPS)


def _ccc_loss_and_presence(pred, target, sample_weight=None) -> tuple[Tensor, Tensor]:
    target = torch.as_tensor(target, device=pred.device).float()
    ccc = ccc_per_column(pred, target, sample_weight)
    w = torch.isfinite(target).float()
    if sample_weight is not None:
        w = w * torch.as_tensor(sample_weight, device=pred.device, dtype=torch.float32)[:, None]
    present = (w.sum(0) > 0).float()  # columns with at least one (weighted) label
    n = present.sum()
    loss = ((1.0 - ccc) * present).sum() / n.clamp_min(1.0)
    return loss, n > 0


def ccc_loss(pred: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """``1 - CCC`` per column (valence, arousal), averaged over the columns that carry labels.

    ``pred``, ``target``: (B, 2). NaN targets are unlabelled (per value); a batch without any label
    gives 0. Population statistics, weighted by ``sample_weight`` when given.
    """
    return _ccc_loss_and_presence(pred, target, sample_weight)[0]


def partition_loss(heads: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """DAN's partition loss on the (B, N, D) head outputs; exactly 0 when N == 1.

    ``log(1 + N / (mean_{samples, channels} var_heads + eps))``, unbiased variance across heads.
    With ``sample_weight`` the mean over samples is weighted.
    """
    heads = heads.float()
    n = heads.size(1)
    if n <= 1:
        return heads.sum() * 0.0
    per_sample = heads.var(dim=1).mean(dim=1)  # (B,)
    if sample_weight is None:
        return torch.log1p(n / (per_sample.mean() + PARTITION_EPS))
    w = _weights(len(per_sample), sample_weight, torch.ones_like(per_sample, dtype=torch.bool),
                 heads.device)
    var = _weighted_mean(per_sample, w)
    return torch.log1p(n / (var + PARTITION_EPS)) * (w.sum() > 0)  # all-zero weights: 0


class AffinityLoss(nn.Module):
    """DAN's affinity loss with learnable class centers (``num_classes`` x ``feat_dim``).

    ``forward(features (B, D), labels (B,) int, sample_weight=None)``; labels < 0 are left out.
    The centers are parameters: the trainer must put them in the optimizer (via ``DANLoss``).
    """

    def __init__(self, num_classes: int = NUM_EXPRESSIONS, feat_dim: int = 512):
        super().__init__()
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        x = features.float()
        labels = torch.as_tensor(labels, device=x.device).long()
        valid = labels >= 0
        centers = self.centers.float()
        dist = (x - centers[labels.clamp_min(0)]).pow(2).sum(dim=1)
        dist = (dist / centers.var(dim=0).sum()).clamp(1e-12, 1e12)
        w = _weights(len(labels), sample_weight, valid, x.device)
        return _weighted_mean(dist, w)


class DANLoss(nn.Module):
    """The combined training loss of a variant.

    task "expr": focal + affinity + partition; "va": CCC + partition; "both": all four.
    ``loss_weights`` (keys expr, va, affinity, partition; default 1 each) scale the parts;
    ``class_weights`` (num_classes,) go to the focal loss.

    ``forward(out, expr_target (B,) int64 with -1 = no label, va_target (B, 2) float with NaN = no
    label, sample_weight=None, batch_totals=None)`` returns ``(total, parts)``; ``parts`` holds detached 0-d float32
    tensors on the loss's device, read on the host only when logged (unweighted loss values, and
    the weighted ``total``), with 0 for parts the task does not use
    or whose weight is 0 (those are not computed, so unused parameters get no gradient at all).

    This module has parameters (the affinity centers): the trainer must add
    ``criterion.parameters()`` to the optimizer, move the module to the device, and save its
    state dict with the checkpoint.
    """

    def __init__(
        self,
        task: str = "both",
        focal_gamma: float = 2.0,
        class_weights: Sequence[float] | Tensor | None = None,
        loss_weights: Mapping[str, float] | None = None,
        num_classes: int = NUM_EXPRESSIONS,
        feat_dim: int = 512,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
        self.task = task
        self.focal_gamma = float(focal_gamma)
        weights = {k: 1.0 for k in LOSS_KEYS}
        for key, value in (loss_weights or {}).items():
            if key not in weights:
                raise ValueError(f"unknown loss weight {key!r}; valid: {', '.join(LOSS_KEYS)}")
            weights[key] = float(value)
        self.loss_weights = weights
        if class_weights is not None:
            cw = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if cw.numel() != num_classes:
                raise ValueError(f"class_weights needs {num_classes} values, got {cw.numel()}")
            self.register_buffer("class_weights", cw)
        else:
            self.class_weights = None
        self.affinity = AffinityLoss(num_classes, feat_dim)

    @property
    def uses_expr(self) -> bool:
        return self.task in ("expr", "both")

    @property
    def uses_va(self) -> bool:
        return self.task in ("va", "both")

    @staticmethod
    def weight_totals(expr_target: Tensor, va_target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        """(4,) float32 on the targets' device: the summed sample weight of the samples with an
        expression label, with a valence label, with an arousal label, and of all samples.
        Computed without a host sync; the denominators of a whole batch for ``forward``'s
        ``batch_totals`` when the batch is fed in micro-batches."""
        expr_target = torch.as_tensor(expr_target)
        va_target = torch.as_tensor(va_target, device=expr_target.device)
        w = (torch.ones(expr_target.shape, device=expr_target.device) if sample_weight is None else
             torch.as_tensor(sample_weight, device=expr_target.device, dtype=torch.float32))
        return torch.cat([(w * (expr_target >= 0)).sum()[None],
                          (w[:, None] * torch.isfinite(va_target)).sum(0), w.sum()[None]]).float()

    def forward(self, out, expr_target: Tensor, va_target: Tensor, sample_weight: Tensor | None = None,
                batch_totals: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        device = out.expr.device
        parts: dict[str, Tensor] = {}
        share = None
        if batch_totals is not None:
            # This call sees one micro-batch of a batch whose :meth:`weight_totals` are
            # ``batch_totals``: each part is scaled by the micro-batch's share of its weight, so
            # that the per-sample means (focal, affinity) summed over the micro-batches equal the
            # whole batch's. CCC and partition are batch statistics: computed per micro-batch.
            mine = self.weight_totals(torch.as_tensor(expr_target, device=device),
                                      torch.as_tensor(va_target, device=device), sample_weight)
            share = mine / batch_totals.to(device).clamp_min(_DIV_EPS)
        if self.uses_expr and (self.loss_weights["expr"] or self.loss_weights["affinity"]):
            expr_target = torch.as_tensor(expr_target, device=device).long()
            if self.loss_weights["expr"]:
                parts["expr"] = focal_loss(out.expr, expr_target, self.focal_gamma,
                                           self.class_weights, sample_weight)
            if self.loss_weights["affinity"]:
                parts["affinity"] = self.affinity(out.features, expr_target, sample_weight)
            if share is not None:
                parts.update({k: parts[k] * share[0] for k in ("expr", "affinity") if k in parts})
        if self.uses_va and self.loss_weights["va"]:
            va_target = torch.as_tensor(va_target, device=device)
            if share is None:
                parts["va"] = ccc_loss(out.va, va_target, sample_weight)
            else:
                present = (batch_totals[1:3].to(device) > 0).float()
                ccc = ccc_per_column(out.va, va_target, sample_weight)
                parts["va"] = ((1.0 - ccc) * share[1:3] * present).sum() / present.sum().clamp_min(1.0)
        if self.loss_weights["partition"]:
            parts["partition"] = partition_loss(out.heads, sample_weight)
            if share is not None:
                parts["partition"] = parts["partition"] * share[3]
        # Only the parts in use enter the graph, so unused parameters get no gradient (None, not
        # zero: weight decay leaves them alone). All weights zero: a zero still attached to it.
        weighted = [self.loss_weights[k] * v for k, v in parts.items()]
        total = torch.stack(weighted).sum() if weighted else out.heads.float().sum() * 0.0
        # Logged values stay 0-d tensors on the loss's device: reading them on the host here (as
        # ``.tolist()`` did) would make every training step wait for the GPU before backward().
        zero = torch.zeros((), device=device)
        logged = [parts.get(k, zero).detach() for k in LOSS_KEYS] + [total.detach()]
        return total, dict(zip(LOSS_KEYS + ("total",), logged))
