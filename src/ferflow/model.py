"""The extended DAN (Distract your Attention Network) of the paper, as one ``nn.Module``.

Layer by layer as yaoing/DAN ``networks/dan.py`` (see ``docs/method.md``):

- ``features``: a torchvision ResNet cut before its pooling/fc (``children()[:-2]``), so the
  state-dict keys are DAN's (``features.0.weight`` = conv1, ``features.1`` = bn1,
  ``features.4..7`` = layer1..4).
- ``reduce``: ResNet-50 only, the team's 2048 -> 1024 -> 512 reduction (two 1x1 conv + BN + ReLU
  blocks, convs without bias since a BN follows); ``nn.Identity`` (no keys) for ResNet-18.
- ``cat_head0 .. cat_head{N-1}``: DAN's cross-attention heads (``.sa`` spatial, ``.ca`` channel),
  with DAN's key names, so a released DAN checkpoint maps key for key.
- fusion: heads stacked to (B, N, 512); log-softmax over the head axis when N > 1; summed.
  The heads' layers run once for all heads (:func:`fused_heads`: concatenated weights, grouped
  convs, batched channel attention), which computes what the head modules compute one by one
  (``fuse_heads = False``) with the same parameters and state-dict keys.
- ``fc`` + ``bn``: Linear(512, 8) -> BatchNorm1d(8): the expression logits (DAN's names).
- ``va_fc`` + ``va_bn``: our valence/arousal head on the same fused vector, Linear(512, 2) ->
  BatchNorm1d(2) -> tanh. The paper only says "tanh for valence/arousal"; we mirror the expression
  branch (FC + BN) so both tasks see the same fused feature, and tanh keeps them in [-1, 1].

Initialisation follows DAN's code exactly: each cross-attention head gets DAN's ``init_weights``
(kaiming_normal fan_out for convs, BN2d weight 1 / bias 0, Linear normal(std=0.001), biases 0);
the new ResNet-50 reduction block gets the same conv/BN rule; ``fc``/``bn``/``va_*`` keep PyTorch's
default init as in DAN (their output is batch-normalised, so the scale of the Linear weights does
not change the function); pretrained backbone weights are never re-initialised.

Input: the model normalises on its own device (``self.normalize``) from RGB NCHW images with values
in 0..255 -- uint8 as the loader yields them, or float already on the 0..255 scale (NOT 0..1).
Normalisation follows the convention of the pretrained weights:

- ``"imagenet"``: RGB / 255, minus ImageNet mean, divided by ImageNet std.
- ``"vggface2"``: RGB -> BGR, 0..255, minus [91.4953, 103.8827, 131.0912] (B, G, R), no std.

Training-mode BatchNorm1d (channel attention, ``bn``, ``va_bn``) needs at least two samples per
batch: train with ``drop_last=True`` or batches of >= 2.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torchvision import models

from .labels import NUM_EXPRESSIONS

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet50")
NORMALIZATIONS = ("imagenet", "vggface2")
FEAT_DIM = 512

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, 0..1 scale
IMAGENET_STD = (0.229, 0.224, 0.225)
VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)  # B, G, R on the 0..255 scale


class DANOutput(NamedTuple):
    expr: Tensor  # (B, num_classes) expression logits after FC + BN; softmax gives probabilities
    va: Tensor  # (B, 2) valence, arousal in [-1, 1] (tanh)
    features: Tensor  # (B, 512) globally pooled (reduced) backbone feature, for the affinity loss
    heads: Tensor  # (B, N, 512) head outputs as fused (after log-softmax over heads when N > 1)


class Normalize(nn.Module):
    """uint8 / 0..255 float RGB NCHW -> normalised float32, on the module's device.

    ``out[:, c] = (in[:, perm[c]] - mean[c]) * inv_std[c]`` with ``perm`` the identity for
    ImageNet and (2, 1, 0) (RGB -> BGR) for VGGFace2. Buffers are not persistent: they follow from
    ``mode`` and never appear in a state dict. The memory format of the input is kept.
    """

    def __init__(self, mode: str = "imagenet"):
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
        self.mode = mode
        if mode == "imagenet":
            mean = [255.0 * m for m in IMAGENET_MEAN]
            inv_std = [1.0 / (255.0 * s) for s in IMAGENET_STD]
            self.bgr = False
        else:
            mean = list(VGGFACE2_MEAN_BGR)
            inv_std = [1.0, 1.0, 1.0]
            self.bgr = True
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", torch.tensor(inv_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
        x = x.to(torch.float32)  # elementwise ops and flip keep a channels-last layout
        if self.bgr:
            x = x.flip(1)
        return (x - self.mean) * self.inv_std

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class SpatialAttention(nn.Module):
    """DAN's spatial attention: 1x1 (512->256) + BN, then 3x3 / 1x3 / 3x1 (256->512) + BN each,
    summed, ReLU, summed over channels to a (B, 1, h, w) map that multiplies the input."""

    def __init__(self, channels: int = FEAT_DIM):
        super().__init__()
        mid = channels // 2
        self.conv1x1 = nn.Sequential(nn.Conv2d(channels, mid, kernel_size=1), nn.BatchNorm2d(mid))
        self.conv_3x3 = nn.Sequential(
            nn.Conv2d(mid, channels, kernel_size=3, padding=1), nn.BatchNorm2d(channels)
        )
        self.conv_1x3 = nn.Sequential(
            nn.Conv2d(mid, channels, kernel_size=(1, 3), padding=(0, 1)), nn.BatchNorm2d(channels)
        )
        self.conv_3x1 = nn.Sequential(
            nn.Conv2d(mid, channels, kernel_size=(3, 1), padding=(1, 0)), nn.BatchNorm2d(channels)
        )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1x1(x)
        y = self.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        y = y.sum(dim=1, keepdim=True)
        return x * y


class ChannelAttention(nn.Module):
    """DAN's channel attention: GAP -> Linear(512, 32) -> BN1d -> ReLU -> Linear(32, 512) ->
    Sigmoid; the pooled vector times the attention, (B, 512)."""

    def __init__(self, channels: int = FEAT_DIM, hidden: int = 32):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.attention = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, sa: Tensor) -> Tensor:
        pooled = self.gap(sa).flatten(1)
        return pooled * self.attention(pooled)


def dan_init_(module: nn.Module) -> None:
    """DAN's ``init_weights``: kaiming_normal(fan_out) convs, BN2d 1/0, Linear normal(0.001), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            init.constant_(m.weight, 1)
            init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                init.constant_(m.bias, 0)


class CrossAttentionHead(nn.Module):
    def __init__(self, channels: int = FEAT_DIM):
        super().__init__()
        self.sa = SpatialAttention(channels)
        self.ca = ChannelAttention(channels)
        dan_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.ca(self.sa(x))


def _head_batch_norms(heads: list[CrossAttentionHead]) -> list[list[nn.modules.batchnorm._BatchNorm]]:
    """The heads' BatchNorms grouped by position (conv1x1, 3x3, 1x3, 3x1, channel attention):
    one list per position, one BN per head."""
    return [[h.sa.conv1x1[1] for h in heads], [h.sa.conv_3x3[1] for h in heads],
            [h.sa.conv_1x3[1] for h in heads], [h.sa.conv_3x1[1] for h in heads],
            [h.ca.attention[1] for h in heads]]


def fusable(heads: list[nn.Module]) -> bool:
    """Whether :func:`fused_heads` computes what the head modules compute: every head is a
    :class:`CrossAttentionHead` with its layers as built (``ferflow.inference.fold_batchnorm``
    replaces them with folded torch.fx graphs, which then run one by one), every BatchNorm is
    affine, tracks running statistics with a fixed momentum, and the BNs at one position agree on
    momentum, eps and train/eval mode (a caller that changes one head's BN makes the model fall
    back to the modules one by one)."""
    bn_type = nn.modules.batchnorm._BatchNorm
    for h in heads:
        if not (isinstance(h, CrossAttentionHead) and isinstance(h.sa, SpatialAttention)
                and isinstance(h.ca, ChannelAttention)):
            return False
        sa = (h.sa.conv1x1, h.sa.conv_3x3, h.sa.conv_1x3, h.sa.conv_3x1)
        att = h.ca.attention
        if not (all(isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d)
                    and isinstance(m[1], bn_type) for m in sa)
                and isinstance(att, nn.Sequential) and len(att) == 5 and isinstance(att[0], nn.Linear)
                and isinstance(att[1], bn_type) and isinstance(att[3], nn.Linear)):
            return False
    for bns in _head_batch_norms(heads):
        first = bns[0]
        for bn in bns:
            if not (bn.affine and bn.track_running_stats and bn.momentum is not None
                    and bn.momentum == first.momentum and bn.eps == first.eps
                    and bn.training == first.training):
                return False
    return True


def _cat_batch_norm(bns: list[nn.modules.batchnorm._BatchNorm], x: Tensor) -> Tensor:
    """``x`` (B, N*C, ...) through N BatchNorms of C channels each, as one ``F.batch_norm`` over
    the concatenated channels: the same per-channel statistics as each BN on its own slice. In
    training mode the running statistics are updated as the modules would (momentum,
    ``num_batches_tracked``) and written back into each module."""
    first = bns[0]
    weight = torch.cat([bn.weight for bn in bns])
    bias = torch.cat([bn.bias for bn in bns])
    mean = torch.cat([bn.running_mean for bn in bns])
    var = torch.cat([bn.running_var for bn in bns])
    out = F.batch_norm(x, mean, var, weight, bias, first.training, first.momentum, first.eps)
    if first.training:  # F.batch_norm updated the concatenated running stats in place
        with torch.no_grad():
            size = first.num_features
            for bn, m, v in zip(bns, mean.split(size), var.split(size)):
                bn.running_mean.copy_(m)
                bn.running_var.copy_(v)
                bn.num_batches_tracked.add_(1)
    return out


def fused_heads(heads: list[CrossAttentionHead], fmap: Tensor) -> Tensor:
    """All N cross-attention heads on ``fmap`` (B, C, h, w) at once: (B, N, C), equal to
    ``torch.stack([head(fmap) for head in heads], dim=1)`` up to float rounding (forward, backward
    and the BN running statistics; ``tests/test_model.py`` checks it). Requires :func:`fusable`.

    Why: the heads run on small maps (4x4 for ResNet-18 at 112 px), where N sets of small
    convolutions, BNs and elementwise ops each pay their launch and thread-synchronisation cost.
    On the CPU with 2 threads, a ResNet-18 DAN training step at 112 px, batch 16, opened 980
    OpenMP parallel regions with the heads one by one, 701 fused (the plain ResNet-18: 459;
    counted by ``bench/omp_regions.py``); on a loaded machine each region waits for a thread
    to be scheduled, and ``bench/train_step.py`` measured the per-head step at 1.55x its FLOP
    share there. Here each layer runs once for all heads, on parameters concatenated inside
    ``forward`` (the heads' modules and state-dict keys stay as they are, and the gradients flow
    back to them through ``torch.cat``). The price: in compute alone (one thread, CPU seconds)
    the grouped convs and the concatenations made the step about 6% slower on the 2-core Xeon
    VM (``bench/train_step.py --threads 1 --cpu-time --per-head``), and the concatenated conv
    weights (34 MB for 4 heads) stay alive until the backward pass. Per layer:

    - conv1x1 (same input for every head): one conv with the weights concatenated along the
      output channels; its BN, one ``F.batch_norm`` over the N*C/2 channels;
    - 3x3, 1x3, 3x1 (each head on its own slice): grouped convs (``groups=N``), a BN each;
    - the spatial map times the input, averaged over h*w (``sa`` then ``ca``'s pooling): one
      batched matrix product, without the (B, C, h, w) product per head;
    - channel attention: ``torch.baddbmm`` over the heads' stacked Linear weights, its BN1d over
      the N*32 concatenated features.
    """
    n = len(heads)
    b, c, h, w = fmap.shape
    sas = [head.sa for head in heads]
    bn_1x1, bn_3x3, bn_1x3, bn_3x1, bn_ca = _head_batch_norms(heads)

    def conv(convs: list[nn.Conv2d], x: Tensor, groups: int) -> Tensor:
        first = convs[0]
        return F.conv2d(x, torch.cat([m.weight for m in convs]), torch.cat([m.bias for m in convs]),
                        padding=first.padding, groups=groups)

    y = _cat_batch_norm(bn_1x1, conv([s.conv1x1[0] for s in sas], fmap, 1))  # (B, N*C/2, h, w)
    z = (_cat_batch_norm(bn_3x3, conv([s.conv_3x3[0] for s in sas], y, n))
         + _cat_batch_norm(bn_1x3, conv([s.conv_1x3[0] for s in sas], y, n))
         + _cat_batch_norm(bn_3x1, conv([s.conv_3x1[0] for s in sas], y, n)))
    spatial = F.relu(z).reshape(b, n, c, h * w).sum(dim=2)  # (B, N, h*w): each head's map
    # mean over h*w of fmap * map: (B, N, h*w) @ (B, h*w, C) / (h*w)
    pooled = torch.bmm(spatial, fmap.reshape(b, c, h * w).transpose(1, 2)) / (h * w)  # (B, N, C)
    lin1 = [head.ca.attention[0] for head in heads]
    lin2 = [head.ca.attention[3] for head in heads]
    hidden = torch.baddbmm(torch.stack([m.bias for m in lin1]).unsqueeze(1), pooled.transpose(0, 1),
                           torch.stack([m.weight for m in lin1]).transpose(1, 2))  # (N, B, 32)
    hidden = _cat_batch_norm(bn_ca, hidden.transpose(0, 1).reshape(b, -1))  # (B, N*32)
    hidden = F.relu(hidden).reshape(b, n, -1).transpose(0, 1)  # (N, B, 32)
    attention = torch.sigmoid(torch.baddbmm(torch.stack([m.bias for m in lin2]).unsqueeze(1), hidden,
                                            torch.stack([m.weight for m in lin2]).transpose(1, 2)))
    return pooled * attention.transpose(0, 1)


def make_caffe_style_(resnet: models.ResNet) -> models.ResNet:
    """Turn a torchvision ResNet-50 into the Caffe layout of the VGGFace2 weights, in place.

    Caffe (and the VGGFace2 ``resnet50_ft`` port) puts the stride of a downsampling bottleneck on
    its first 1x1 conv, torchvision on the 3x3; and the stem max-pool is (3, 2, padding 0,
    ceil_mode=True). The parameter shapes (hence key names) are the same, so only strides change.
    """
    for layer in (resnet.layer2, resnet.layer3, resnet.layer4):
        block = layer[0]
        block.conv1.stride = (2, 2)
        block.conv2.stride = (1, 1)
    resnet.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    return resnet


def _reduction_block() -> nn.Sequential:
    block = nn.Sequential(
        nn.Conv2d(2048, 1024, kernel_size=1, bias=False),
        nn.BatchNorm2d(1024),
        nn.ReLU(inplace=True),
        nn.Conv2d(1024, FEAT_DIM, kernel_size=1, bias=False),
        nn.BatchNorm2d(FEAT_DIM),
        nn.ReLU(inplace=True),
    )
    dan_init_(block)
    return block


class DAN(nn.Module):
    """Extended DAN: ResNet backbone, ``num_heads`` cross-attention heads, expression + VA heads.

    ``forward`` takes RGB NCHW images in 0..255 (uint8, or float on the 0..255 scale) and returns a
    :class:`DANOutput`. ``caffe_style`` selects the Caffe ResNet-50 layout of the VGGFace2 weights
    (see :func:`make_caffe_style_`); :func:`build_model` sets it for ``format: vggface2``.
    Works for any input of at least 32x32 (112 -> 4x4 and 224 -> 7x7 feature maps).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_heads: int = 4,
        num_classes: int = NUM_EXPRESSIONS,
        normalization: str = "imagenet",
        caffe_style: bool = False,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
        if int(num_heads) < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if caffe_style and backbone != "resnet50":
            raise ValueError("caffe_style applies to the resnet50 backbone only")
        self.config = {
            "backbone": backbone,
            "num_heads": int(num_heads),
            "num_classes": int(num_classes),
            "normalization": normalization,
            "caffe_style": bool(caffe_style),
        }
        self.normalize = Normalize(normalization)
        if backbone == "resnet18":
            resnet = models.resnet18(weights=None)
            self.reduce: nn.Module = nn.Identity()
        else:
            resnet = models.resnet50(weights=None)
            if caffe_style:
                make_caffe_style_(resnet)
            self.reduce = _reduction_block()
        self.features = nn.Sequential(*list(resnet.children())[:-2])
        self.num_head = int(num_heads)  # DAN's attribute name
        # False: the heads run one module after the other (the bench's per-head side, tests).
        self.fuse_heads = True
        for i in range(self.num_head):
            setattr(self, f"cat_head{i}", CrossAttentionHead(FEAT_DIM))
        self.fc = nn.Linear(FEAT_DIM, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)
        self.va_fc = nn.Linear(FEAT_DIM, 2)
        self.va_bn = nn.BatchNorm1d(2)

    @property
    def num_heads(self) -> int:
        return self.num_head

    def head_modules(self) -> list[CrossAttentionHead]:
        return [getattr(self, f"cat_head{i}") for i in range(self.num_head)]

    def run_heads(self, fmap: Tensor) -> Tensor:
        """The cross-attention heads on the (B, 512, h, w) feature map: (B, N, 512), head ``i`` at
        ``[:, i]``, before the fusion. All heads at once (:func:`fused_heads`) when their layers
        allow it, else the head modules one by one (same result within float rounding)."""
        heads = self.head_modules()
        if self.fuse_heads and fusable(heads):
            return fused_heads(heads, fmap)
        return torch.stack([head(fmap) for head in heads], dim=1)

    def forward(self, images: Tensor) -> DANOutput:
        x = self.normalize(images)
        fmap = self.reduce(self.features(x))
        heads = self.run_heads(fmap)
        # The output layers run in float32 even under autocast: in bf16 (8 significant bits) the
        # logits flip the predicted class of ~0.2% of samples and VA takes ~120 levels per unit.
        with torch.autocast(device_type=fmap.device.type, enabled=False):
            features = fmap.float().mean(dim=(2, 3))
            heads = heads.float()
            if heads.size(1) > 1:
                heads = F.log_softmax(heads, dim=1)
            fused = heads.sum(dim=1)
            expr = self.bn(self.fc(fused))
            va = torch.tanh(self.va_bn(self.va_fc(fused)))
        return DANOutput(expr=expr, va=va, features=features, heads=heads)


def build_model(settings: dict, load_pretrained: bool = True) -> DAN:
    """Build a DAN from a variant's settings and load its pretrained weights.

    Keys used: ``backbone`` ("resnet18" | "resnet50", default resnet18), ``heads`` (int, default 4),
    ``pretrained`` (None, or ``{"format": "vggface2" | "torchvision" | "dan", "path": str}``).
    ``num_classes`` (default 8) is honoured if present. The normalisation follows the weights'
    format (vggface2 -> "vggface2" with a Caffe-style ResNet-50, else "imagenet").

    ``load_pretrained=False`` builds the same architecture without reading the weight file (use it
    to rebuild a trained model before loading its checkpoint, e.g. in prediction).
    """
    from . import weights  # local import: weights imports this module

    backbone = settings.get("backbone", "resnet18")
    heads = int(settings.get("heads", 4))
    num_classes = int(settings.get("num_classes", NUM_EXPRESSIONS))
    pretrained = settings.get("pretrained")
    fmt = None
    if pretrained:
        fmt = pretrained.get("format")
        if fmt not in weights.FORMATS:
            raise ValueError(
                f"unknown pretrained format {fmt!r}; valid: {', '.join(weights.FORMATS)}"
            )
        if fmt == "vggface2" and backbone != "resnet50":
            raise ValueError(
                f"vggface2 weights are a ResNet-50; backbone {backbone!r} cannot use them"
            )
    normalization = "vggface2" if fmt == "vggface2" else "imagenet"
    model = DAN(
        backbone=backbone,
        num_heads=heads,
        num_classes=num_classes,
        normalization=normalization,
        caffe_style=(fmt == "vggface2"),
    )
    if pretrained and load_pretrained:
        weights.load_pretrained(model, fmt, pretrained["path"])
    return model


def read_checkpoint(path: str | os.PathLike, keys: tuple[str, ...], what: str) -> dict:
    """The dict of a checkpoint written by ``torch.save``, read with ``torch.load(weights_only=True)``
    on the CPU. KeyError ``"{path}: not a {what} (...)"`` when torch.load cannot read it (text, a
    truncated file, a pickle of objects), when it holds no dict, or when one of ``keys`` is missing."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...: all "not a model"
        if type(exc).__name__ == "UnpicklingError":  # torch's message is a page about weights_only
            reason = "not a file of tensors and plain values written by torch.save"
        else:
            reason = (str(exc).strip().splitlines() or [""])[0][:160] or type(exc).__name__
        raise KeyError(f"{path}: not a {what} (torch.load cannot read it: {reason})") from None
    if not isinstance(ckpt, dict):
        raise KeyError(f"{path}: not a {what} (holds a {type(ckpt).__name__}, not a dict)")
    for key in keys:
        if key not in ckpt:
            raise KeyError(f"{path}: not a {what} (no {key!r})")
    return ckpt


def load_model(path: str | os.PathLike, device: torch.device) -> tuple[DAN, dict]:
    """The model of a ``model.pt`` written by ``ferflow.train`` and its training settings: rebuilt
    by :func:`build_model` (the pretrained file is not read again), the weights read with
    ``torch.load(weights_only=True)``, on ``device``, in eval mode. KeyError names a file that is
    not a ferflow model (also one that torch.load cannot read: text, a truncated file, a pickle)."""
    ckpt = read_checkpoint(path, ("model_state_dict", "settings"), "ferflow model file")
    settings = ckpt["settings"]
    model = build_model(settings, load_pretrained=False)
    model.load_state_dict(ckpt["model_state_dict"])
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.eval()
    return model, settings
