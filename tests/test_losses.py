"""Losses against hand computations, edge cases, and DANLoss masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferflow.losses import AffinityLoss, DANLoss, ccc_loss, ccc_per_column, focal_loss, partition_loss
from ferflow.metrics import ccc as numpy_ccc
from ferflow.model import DANOutput

NAN = float("nan")


# --- focal ---------------------------------------------------------------------------------
def test_focal_gamma0_is_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 8), torch.tensor([0, 1, 7, 3, 3, 5])
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))


def test_focal_gamma2_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = 1 / (2 + math.e)
    want = (-(1 - p0) ** 2 * math.log(p0) - (1 - p1) ** 2 * math.log(p1)) / 2
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(want, rel=1e-6)
    # the modulating factor only ever lowers the loss
    assert focal_loss(logits, target, gamma=2.0) < focal_loss(logits, target, gamma=0.0)


def test_focal_class_weights_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    w = torch.tensor([1.0, 2.0, 0.5])
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = 1 / (2 + math.e)
    want = (1.0 * -(1 - p0) ** 2 * math.log(p0) + 0.5 * -(1 - p1) ** 2 * math.log(p1)) / 2
    assert focal_loss(logits, target, 2.0, weight=w).item() == pytest.approx(want, rel=1e-6)
    # gamma 0: class-weighted cross-entropy, averaged over samples (not renormalised by the weights)
    ce = F.cross_entropy(logits, target, weight=w, reduction="none").mean()
    torch.testing.assert_close(focal_loss(logits, target, 0.0, weight=w), ce)


def test_focal_one_sample_and_ignored_targets_and_sample_weights():
    torch.manual_seed(0)
    logits = torch.randn(4, 8)
    target = torch.tensor([2, -1, 5, 0])
    one = focal_loss(logits[:1], target[:1])
    p = F.softmax(logits[0], 0)[2].item()
    assert one.item() == pytest.approx(-(1 - p) ** 2 * math.log(p), rel=1e-5)
    # -1 targets are left out
    keep = target >= 0
    torch.testing.assert_close(focal_loss(logits, target), focal_loss(logits[keep], target[keep]))
    # an integer sample weight is a repetition (bootstrap multiplicity); weight 0 drops a sample
    sw = torch.tensor([2.0, 1.0, 0.0, 1.0])
    rep = torch.cat([logits[:1], logits[:1], logits[3:]])
    torch.testing.assert_close(focal_loss(logits, target, sample_weight=sw),
                               focal_loss(rep, torch.tensor([2, 2, 0])))
    # no labelled sample: exactly 0 and still differentiable
    x = logits.clone().requires_grad_()
    empty = focal_loss(x, torch.full((4,), -1))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() == 0


# --- affinity --------------------------------------------------------------------------------
def dan_affinity_reference(x, labels, centers):
    """DAN's AffinityLoss.forward, on already pooled features."""
    b, c = x.size(0), centers.size(0)
    distmat = x.pow(2).sum(1, keepdim=True).expand(b, c) + \
        centers.pow(2).sum(1, keepdim=True).expand(c, b).t()
    distmat = distmat.addmm(x, centers.t(), beta=1, alpha=-2)
    mask = labels.unsqueeze(1).expand(b, c).eq(torch.arange(c).expand(b, c))
    dist = distmat * mask.float() / centers.var(dim=0).sum()
    return dist.clamp(min=1e-12, max=1e12).sum() / b


def test_affinity_by_hand_with_a_class_absent():
    loss = AffinityLoss(num_classes=3, feat_dim=2)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]))
    x = torch.tensor([[1.0, 1.0], [2.0, 3.0]])
    labels = torch.tensor([0, 1])  # class 2 absent from the batch
    # unbiased variances over the centers: 4/3 and 16/3 -> 20/3; distances 2 and 9
    want = (2 + 9) / (20 / 3) / 2
    got = loss(x, labels)
    assert got.item() == pytest.approx(want, rel=1e-6)
    ref = dan_affinity_reference(x, labels, loss.centers.detach())
    assert got.item() == pytest.approx(ref.item(), abs=1e-9)  # DAN adds (C-1) * 1e-12 per sample
    # a -1 label is left out; a batch of one sample
    got3 = loss(torch.cat([x, torch.tensor([[9.0, 9.0]])]), torch.tensor([0, 1, -1]))
    assert got3.item() == pytest.approx(want, rel=1e-6)
    assert loss(x[1:], labels[1:]).item() == pytest.approx(9 / (20 / 3), rel=1e-6)


def test_affinity_gradients_reach_centers_and_features():
    torch.manual_seed(0)
    loss = AffinityLoss(num_classes=8, feat_dim=16)
    x = torch.randn(5, 16, requires_grad=True)
    out = loss(x, torch.tensor([0, 0, 3, -1, 7]))
    out.backward()
    assert torch.isfinite(out) and x.grad[3].abs().sum() == 0 and x.grad[0].abs().sum() > 0
    g = loss.centers.grad
    # absent classes' centers move only through the variance normaliser, all finite
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0
    empty = loss(x, torch.full((5,), -1))
    assert empty.item() == 0.0


# --- CCC -------------------------------------------------------------------------------------
def test_ccc_by_hand_and_against_numpy_metric():
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[2.0], [2.0], [5.0]])
    # means 2, 3; variances 2/3, 2; covariance 1 -> 2 / (2/3 + 2 + 1) = 6/11
    assert ccc_per_column(x, y).item() == pytest.approx(6 / 11, rel=1e-6)
    torch.manual_seed(0)
    pred, target = torch.rand(50, 2) * 2 - 1, torch.rand(50, 2) * 2 - 1
    want = [numpy_ccc(pred[:, i].numpy(), target[:, i].numpy()) for i in range(2)]
    torch.testing.assert_close(ccc_per_column(pred, target), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert ccc_loss(pred, target).item() == pytest.approx(1 - sum(want) / 2, rel=1e-5)


def test_ccc_perfect_is_zero_loss():
    torch.manual_seed(0)
    target = torch.rand(16, 2) * 2 - 1
    assert ccc_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)


def test_ccc_constant_predictions_no_nan():
    target = torch.tensor([[0.1, 0.5], [0.3, -0.2], [-0.4, 0.0]])
    pred = torch.full((3, 2), 0.2, requires_grad=True)
    loss = ccc_loss(pred, target)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # constant prediction AND constant target (zero denominator) -> CCC 0, finite gradient
    pred2 = torch.full((3, 2), 0.2, requires_grad=True)
    loss2 = ccc_loss(pred2, torch.full((3, 2), 0.2))
    assert loss2.item() == pytest.approx(1.0)
    loss2.backward()
    assert torch.isfinite(pred2.grad).all()
    # a batch of one sample
    one = ccc_loss(torch.tensor([[0.3, 0.1]], requires_grad=True), torch.tensor([[0.1, 0.1]]))
    assert torch.isfinite(one)


def test_ccc_per_dimension_differs_from_flattened_published_bug():
    # valence and arousal live at different levels; predictions get each level right but carry
    # no within-dimension information at all -> per-dimension CCC 0, loss 1
    target = torch.tensor([[0.1, -0.5], [0.2, -0.4], [0.3, -0.6], [0.4, -0.5]])
    pred = torch.tensor([[0.25, -0.5]]).expand(4, 2)
    per_dim = ccc_loss(pred, target)
    assert per_dim.item() == pytest.approx(1.0, abs=1e-6)
    flat = 1 - ccc_per_column(pred.reshape(-1, 1), target.reshape(-1, 1))[0]
    assert flat.item() < 0.1  # the flattened CCC rewards the between-dimension offset
    assert abs(per_dim.item() - flat.item()) > 0.9


def test_ccc_nan_targets_and_sample_weights():
    torch.manual_seed(0)
    pred, target = torch.rand(6, 2), torch.rand(6, 2)
    masked = target.clone()
    masked[4, :] = NAN
    masked[5, 1] = NAN  # arousal missing, valence present
    got = ccc_per_column(pred, masked)
    rows_v = torch.tensor([0, 1, 2, 3, 5])
    want_v = ccc_per_column(pred[rows_v, :1], target[rows_v, :1])
    want_a = ccc_per_column(pred[:4, 1:], target[:4, 1:])
    torch.testing.assert_close(got, torch.cat([want_v, want_a]))
    # weights are multiplicities
    sw = torch.tensor([1.0, 3.0, 0.0, 1.0, 1.0, 2.0])
    idx = torch.tensor([0, 1, 1, 1, 3, 4, 5, 5])
    torch.testing.assert_close(ccc_loss(pred, target, sw), ccc_loss(pred[idx], target[idx]))
    # no label at all: 0, differentiable
    p = pred.clone().requires_grad_()
    empty = ccc_loss(p, torch.full((6, 2), NAN))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(p.grad).all()


# --- partition -------------------------------------------------------------------------------
def test_partition_by_hand_two_heads():
    heads = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])  # B=1, N=2, D=2
    # unbiased variance across 2 heads: (a-b)^2/2 -> 2 and 8; mean 5
    assert partition_loss(heads).item() == pytest.approx(math.log(1 + 2 / 5), rel=1e-6)
    two = torch.cat([heads, torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])])  # second sample: 0 and 2
    assert partition_loss(two).item() == pytest.approx(math.log(1 + 2 / 3), rel=1e-6)
    w = torch.tensor([1.0, 3.0])  # weighted mean variance (5 + 3*1)/4 = 2
    assert partition_loss(two, w).item() == pytest.approx(math.log(1 + 2 / 2), rel=1e-6)


def test_partition_one_head_is_exactly_zero():
    heads = torch.randn(3, 1, 8, requires_grad=True)
    loss = partition_loss(heads)
    assert loss.item() == 0.0
    loss.backward()
    assert heads.grad.abs().sum() == 0


# --- DANLoss ---------------------------------------------------------------------------------
def fake_output(b, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DANOutput(
        expr=torch.randn(b, 8, generator=g).requires_grad_(),
        va=torch.tanh(torch.randn(b, 2, generator=g)).requires_grad_(),
        features=torch.randn(b, 512, generator=g).requires_grad_(),
        heads=F.log_softmax(torch.randn(b, n, 512, generator=g), dim=1).requires_grad_(),
    )


def _cat(a, b):
    return DANOutput(*[torch.cat([x.detach(), y.detach()]) for x, y in zip(a, b)])


def floats(parts: dict) -> dict:
    """DANLoss's logged parts (0-d tensors, read on the host only when logged) as floats."""
    return {k: v.item() for k, v in parts.items()}


def test_dan_loss_masks_unlabelled_samples():
    torch.manual_seed(0)
    crit = DANLoss(task="both")
    out = fake_output(4)
    expr = torch.tensor([0, 3, 3, 6])
    va = torch.rand(4, 2) * 2 - 1
    _, base = crit(out, expr, va)
    base = floats(base)
    extra = fake_output(3, seed=1)  # samples with no label of either kind
    _, more = crit(_cat(out, extra), torch.cat([expr, torch.full((3,), -1)]),
                   torch.cat([va, torch.full((3, 2), NAN)]))
    more = floats(more)
    for key in ("expr", "va", "affinity"):
        assert more[key] == pytest.approx(base[key], rel=1e-6, abs=1e-7)
    # parts are the plain losses
    assert base["expr"] == pytest.approx(focal_loss(out.expr, expr, 2.0).item(), rel=1e-6)
    assert base["va"] == pytest.approx(ccc_loss(out.va, va).item(), rel=1e-6)
    assert base["partition"] == pytest.approx(partition_loss(out.heads).item(), rel=1e-6)
    assert base["total"] == pytest.approx(
        base["expr"] + base["va"] + base["affinity"] + base["partition"], rel=1e-6)


def test_dan_loss_batch_without_expression_labels():
    crit = DANLoss(task="both")
    out = fake_output(4)
    va = torch.rand(4, 2)
    total, parts = crit(out, torch.full((4,), -1), va)
    parts = floats(parts)
    assert parts["expr"] == 0.0 and parts["affinity"] == 0.0
    assert math.isfinite(parts["total"]) and parts["va"] > 0
    total.backward()
    assert out.va.grad.abs().sum() > 0 and out.heads.grad.abs().sum() > 0
    assert torch.isfinite(out.expr.grad).all() and out.expr.grad.abs().sum() == 0
    # expression-only variant with neither label: only the (label-free) partition loss remains
    out2 = fake_output(4)
    total2, parts2 = DANLoss(task="expr")(out2, torch.full((4,), -1), torch.full((4, 2), NAN))
    parts2 = floats(parts2)
    total2.backward()
    assert parts2["total"] == pytest.approx(parts2["partition"])
    assert out2.heads.grad is not None
    # nothing weighted at all: a zero that still backpropagates
    out3 = fake_output(2)
    total3, parts3 = DANLoss(task="va", loss_weights={"partition": 0})(
        out3, torch.full((2,), -1), torch.full((2, 2), NAN))
    parts3 = floats(parts3)
    total3.backward()
    assert parts3["total"] == 0.0


def test_dan_loss_task_selection_weights_and_validation():
    out = fake_output(4)
    expr, va = torch.tensor([1, 2, 3, 4]), torch.rand(4, 2)
    _, p_va = DANLoss(task="va")(out, expr, va)
    p_va = floats(p_va)
    assert p_va["expr"] == 0.0 and p_va["affinity"] == 0.0 and p_va["va"] > 0
    _, p_ex = DANLoss(task="expr")(out, expr, va)
    p_ex = floats(p_ex)
    assert p_ex["va"] == 0.0 and p_ex["expr"] > 0 and p_ex["affinity"] > 0
    crit = DANLoss(task="both", loss_weights={"va": 2.0, "affinity": 0.5})
    _, p = crit(out, expr, va)
    p = floats(p)
    assert p["total"] == pytest.approx(p["expr"] + 2 * p["va"] + 0.5 * p["affinity"] + p["partition"],
                                       rel=1e-6)
    cw = torch.arange(1.0, 9.0)
    _, pw = DANLoss(task="expr", class_weights=cw, focal_gamma=0.0)(out, expr, va)
    pw = floats(pw)
    want = F.cross_entropy(out.expr, expr, weight=cw, reduction="none").mean().item()
    assert pw["expr"] == pytest.approx(want, rel=1e-6)
    assert [n for n, _ in DANLoss().named_parameters()] == ["affinity.centers"]
    with pytest.raises(ValueError, match="task"):
        DANLoss(task="au")
    with pytest.raises(ValueError, match="loss weight"):
        DANLoss(loss_weights={"ccc": 1.0})
    with pytest.raises(ValueError, match="class_weights"):
        DANLoss(class_weights=[1.0, 2.0])


def test_dan_loss_sample_weights_are_multiplicities():
    out = fake_output(3)
    expr = torch.tensor([1, -1, 5])
    va = torch.tensor([[0.1, 0.2], [0.5, -0.3], [NAN, NAN]])
    crit = DANLoss(task="both", loss_weights={"partition": 0})
    _, weighted = crit(out, expr, va, sample_weight=torch.tensor([2.0, 1.0, 3.0]))
    weighted = floats(weighted)
    idx = torch.tensor([0, 0, 1, 2, 2, 2])
    rep = DANOutput(*[t.detach()[idx] for t in out])
    _, repeated = crit(rep, expr[idx], va[idx])
    repeated = floats(repeated)
    for key in ("expr", "va", "affinity", "total"):
        assert weighted[key] == pytest.approx(repeated[key], rel=1e-5)


def test_dan_loss_handles_bf16_outputs():
    out = DANOutput(*[t.detach().to(torch.bfloat16) for t in fake_output(4)])
    total, parts = DANLoss()(out, torch.tensor([0, 1, 2, 3]), torch.rand(4, 2))
    parts = floats(parts)
    assert total.dtype == torch.float32 and np.isfinite(list(parts.values())).all()
