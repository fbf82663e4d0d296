"""DAN model: parity with an independent reference, shapes, Caffe-style backbone, normalisation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from ferflow.losses import DANLoss, partition_loss
from ferflow.model import DAN, DANOutput, build_model

torch.set_num_threads(1)


# --- an independent reference, written from the layer description in docs/method.md ----------
class RefSpatial(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(512, 256, 1), nn.BatchNorm2d(256))
        self.conv_3x3 = nn.Sequential(nn.Conv2d(256, 512, 3, padding=1), nn.BatchNorm2d(512))
        self.conv_1x3 = nn.Sequential(nn.Conv2d(256, 512, (1, 3), padding=(0, 1)), nn.BatchNorm2d(512))
        self.conv_3x1 = nn.Sequential(nn.Conv2d(256, 512, (3, 1), padding=(1, 0)), nn.BatchNorm2d(512))

    def forward(self, x):
        y = self.conv1x1(x)
        y = F.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        return x * y.sum(dim=1, keepdim=True)


class RefChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Sequential(
            nn.Linear(512, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 512), nn.Sigmoid()
        )

    def forward(self, x):
        v = x.mean(dim=(2, 3))
        return v * self.attention(v)


class RefHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.sa = RefSpatial()
        self.ca = RefChannel()

    def forward(self, x):
        return self.ca(self.sa(x))


class RefDAN(nn.Module):
    """DAN-ResNet-18 with 8 classes, plus the valence/arousal head (Linear, BN1d, tanh)."""

    def __init__(self, num_head=4):
        super().__init__()
        self.features = nn.Sequential(*list(models.resnet18(weights=None).children())[:-2])
        self.num_head = num_head
        for i in range(num_head):
            setattr(self, "cat_head%d" % i, RefHead())
        self.fc = nn.Linear(512, 8)
        self.bn = nn.BatchNorm1d(8)
        self.va_fc = nn.Linear(512, 2)
        self.va_bn = nn.BatchNorm1d(2)

    def forward(self, x):  # x already normalised
        x = self.features(x)
        heads = torch.stack([getattr(self, "cat_head%d" % i)(x) for i in range(self.num_head)])
        heads = heads.permute(1, 0, 2)
        if heads.size(1) > 1:
            heads = F.log_softmax(heads, dim=1)
        fused = heads.sum(dim=1)
        return self.bn(self.fc(fused)), torch.tanh(self.va_bn(self.va_fc(fused))), x, heads


def _randomise_bn_stats(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_parity_with_reference_dan_resnet18(num_heads):
    torch.manual_seed(0)
    ours = DAN("resnet18", num_heads=num_heads)
    _randomise_bn_stats(ours)
    ref = RefDAN(num_heads)
    # key for key, strict: our names are DAN's (plus the VA head, which the reference also has)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert list(ref.state_dict()) == list(ours.state_dict())
    ours.eval(), ref.eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = ours(images)
        normalised = ours.normalize(images)
        torch.testing.assert_close(normalised, (images.float() / 255 - mean) / std)
        expr, va, fmap, heads = ref(normalised)
    torch.testing.assert_close(out.expr, expr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.va, va, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.heads, heads, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.features, fmap.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)


def test_dan_key_names_without_va_head_are_dans():
    keys = set(DAN("resnet18", num_heads=2).state_dict())
    ours_without_va = {k for k in keys if not k.startswith(("va_fc.", "va_bn."))}
    assert "features.0.weight" in keys and "features.7.1.bn2.running_var" in keys
    assert "cat_head1.sa.conv1x1.0.weight" in keys and "cat_head1.ca.attention.3.bias" in keys
    assert {"fc.weight", "fc.bias", "bn.weight", "bn.running_mean"} <= keys
    assert not any(k.startswith(("reduce.", "normalize.")) for k in ours_without_va)


@pytest.mark.parametrize(
    "backbone,num_heads,size,fmap",
    [
        ("resnet18", 1, 64, 2),
        ("resnet18", 4, 112, 4),
        ("resnet50", 1, 64, 2),
        ("resnet50", 4, 112, 4),
    ],
)
def test_output_shapes(backbone, num_heads, size, fmap):
    torch.manual_seed(0)
    model = DAN(backbone, num_heads=num_heads).eval()
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        trunk = model.reduce(model.features(model.normalize(images)))
    assert isinstance(out, DANOutput)
    assert out.expr.shape == (2, 8)
    assert out.va.shape == (2, 2)
    assert out.features.shape == (2, 512)
    assert out.heads.shape == (2, num_heads, 512)
    assert trunk.shape == (2, 512, fmap, fmap)
    assert out.va.abs().max() <= 1
    if num_heads > 1:  # log-softmax over the heads
        torch.testing.assert_close(out.heads.exp().sum(dim=1), torch.ones(2, 512))


def test_one_head_has_no_log_softmax_and_zero_partition():
    torch.manual_seed(0)
    model = DAN("resnet18", num_heads=1).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        raw = model.cat_head0(model.features(model.normalize(images)))
    torch.testing.assert_close(out.heads[:, 0], raw)
    torch.testing.assert_close(out.expr, model.bn(model.fc(raw)))
    assert partition_loss(out.heads).item() == 0.0


def test_minimum_input_size_32():
    model = DAN("resnet18", num_heads=2).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.expr.shape == (2, 8) and torch.isfinite(out.expr).all()


def test_caffe_style_resnet50():
    model = DAN("resnet50", num_heads=1, normalization="vggface2", caffe_style=True).eval()
    feats = model.features
    stem_pool = feats[3]
    assert isinstance(stem_pool, nn.MaxPool2d)
    assert (stem_pool.kernel_size, stem_pool.stride, stem_pool.padding, stem_pool.ceil_mode) == (
        3, 2, 0, True)
    for index in (5, 6, 7):  # layer2..4
        first = feats[index][0]
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
        assert first.downsample[0].stride == (2, 2)
        for block in list(feats[index])[1:]:
            assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)
    assert feats[4][0].conv1.stride == (1, 1)  # layer1 does not downsample
    # torchvision layout for comparison: stride on the 3x3
    tv = DAN("resnet50", num_heads=1).features
    assert tv[5][0].conv1.stride == (1, 1) and tv[5][0].conv2.stride == (2, 2)
    assert tv[3].padding == 1 and not tv[3].ceil_mode
    with torch.no_grad():
        fmap = feats(torch.zeros(1, 3, 224, 224))
        assert fmap.shape == (1, 2048, 7, 7)
        # ceil-mode pooling: 112 -> 56 (floor would give 55 without padding)
        assert feats[:4](torch.zeros(1, 3, 224, 224)).shape[-1] == 56
        stem = feats[:3](torch.zeros(1, 3, 224, 224))  # 112 x 112 before the pool
        assert F.max_pool2d(stem, 3, 2, 0, ceil_mode=False).shape[-1] == 55


def test_caffe_style_only_for_resnet50():
    with pytest.raises(ValueError, match="resnet50"):
        DAN("resnet18", caffe_style=True)


def test_normalisation_on_a_known_pixel():
    pixel = torch.tensor([100, 110, 120], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    vgg = DAN("resnet50", num_heads=1, normalization="vggface2", caffe_style=True).normalize
    got = vgg(pixel)[0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor([120 - 91.4953, 110 - 103.8827, 100 - 131.0912]))
    imnet = DAN("resnet18", num_heads=1).normalize
    got = imnet(pixel)[0, :, 0, 0]
    want = torch.tensor([(100 / 255 - 0.485) / 0.229, (110 / 255 - 0.456) / 0.224,
                         (120 / 255 - 0.406) / 0.225])
    torch.testing.assert_close(got, want)
    # float input is on the 0..255 scale too
    torch.testing.assert_close(imnet(pixel.float()), imnet(pixel))
    # buffers move with the model but are not part of its state dict
    assert not any(k.startswith("normalize") for k in DAN("resnet18", 1).state_dict())


def test_normalisation_keeps_channels_last():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    for mode in ("imagenet", "vggface2"):
        y = DAN("resnet50" if mode == "vggface2" else "resnet18", 1, normalization=mode).normalize(x)
        assert y.dtype == torch.float32
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_bad_input_and_settings():
    model = DAN("resnet18", num_heads=1)
    with pytest.raises(ValueError, match="RGB"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="backbone"):
        DAN("vgg16")
    with pytest.raises(ValueError, match="num_heads"):
        DAN("resnet18", num_heads=0)
    with pytest.raises(ValueError, match="normalization"):
        DAN("resnet18", normalization="bgr")


def test_dan_initialisation_of_heads():
    torch.manual_seed(0)
    model = DAN("resnet50", num_heads=2)
    head = model.cat_head0
    conv = head.sa.conv_3x3[0]
    fan_out = conv.out_channels * 3 * 3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert conv.bias.abs().max().item() == 0
    assert head.sa.conv_3x3[1].weight.eq(1).all() and head.sa.conv_3x3[1].bias.eq(0).all()
    lin = head.ca.attention[0]
    assert lin.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert lin.bias.abs().max().item() == 0
    red = model.reduce[0]
    assert red.weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.05)


def test_build_model_picks_normalisation_and_layout(tmp_path):
    missing = str(tmp_path / "absent.pkl")
    m = build_model({"backbone": "resnet50", "heads": 2,
                     "pretrained": {"format": "vggface2", "path": missing}}, load_pretrained=False)
    assert m.normalize.mode == "vggface2" and m.config["caffe_style"]
    assert m.features[5][0].conv1.stride == (2, 2)
    m = build_model({"backbone": "resnet18", "heads": 3, "pretrained": None})
    assert m.normalize.mode == "imagenet" and m.num_heads == 3 and not m.config["caffe_style"]
    m = build_model({"backbone": "resnet18", "heads": 1,
                     "pretrained": {"format": "dan", "path": missing}}, load_pretrained=False)
    assert m.normalize.mode == "imagenet"
    with pytest.raises(FileNotFoundError, match="absent.pkl"):
        build_model({"backbone": "resnet50", "heads": 1,
                     "pretrained": {"format": "torchvision", "path": missing}})
    with pytest.raises(ValueError, match="ResNet-50"):
        build_model({"backbone": "resnet18", "pretrained": {"format": "vggface2", "path": missing}})
    with pytest.raises(ValueError, match="format"):
        build_model({"backbone": "resnet18", "pretrained": {"format": "caffe", "path": missing}})


@pytest.mark.parametrize("task", ["expr", "va", "both"])
def test_training_step_reaches_every_parameter(task):
    torch.manual_seed(0)
    model = DAN("resnet18", num_heads=2).train()
    criterion = DANLoss(task=task)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    expr = torch.tensor([0, 3, -1, 7])
    va = torch.tensor([[0.1, 0.2], [float("nan"), float("nan")], [-0.5, 0.3], [0.9, -0.9]])
    total, parts = criterion(model(images), expr, va)
    total.backward()
    assert set(parts) == {"expr", "va", "affinity", "partition", "total"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad and math.isfinite(v)
               for v in parts.values())
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    if task == "both":
        assert no_grad == []
    elif task == "expr":  # the VA head is unused
        assert sorted(no_grad) == ["va_bn.bias", "va_bn.weight", "va_fc.bias", "va_fc.weight"]
    else:  # va + partition: the expression classifier is unused
        assert sorted(no_grad) == ["bn.bias", "bn.weight", "fc.bias", "fc.weight"]
    # unused parameters get no gradient at all (not a zero one that weight decay would act on)
    assert (criterion.affinity.centers.grad is not None) == (task != "va")


def test_outputs_are_float32_under_bf16_autocast():
    """Under bf16 autocast the logits, VA and pooled features came out in bf16 (8 significant
    bits: ~0.2% of predicted classes flip, VA takes ~120 levels per unit); the output layers now
    run in float32."""
    torch.manual_seed(0)
    model = DAN("resnet18", num_heads=2).eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        assert model.fc(torch.zeros(1, 512)).dtype == torch.bfloat16  # autocast is on here
    for name in ("expr", "va", "features", "heads"):
        assert getattr(out, name).dtype == torch.float32, name
    with torch.no_grad():  # the output layers in float32 on the fused heads, outside autocast
        fused = out.heads.sum(dim=1)
        expr = model.bn(model.fc(fused))
        va = torch.tanh(model.va_bn(model.va_fc(fused)))
    assert torch.allclose(out.expr, expr, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.va, va, rtol=1e-6, atol=1e-6)


# --- the heads run fused (``model.fused_heads``); the reference is the head modules one by one ---
def _head_state_buffers(heads):
    return {f"{i}.{name}": b.double().clone() for i, head in enumerate(heads)
            for name, b in head.named_buffers()}


def _head_state(heads):
    """Every parameter, gradient and buffer of the heads, by name (float64 copies)."""
    state = {}
    for i, head in enumerate(heads):
        for name, p in head.named_parameters():
            state[f"{i}.{name}"] = p.detach().double().clone()
            state[f"{i}.{name}.grad"] = p.grad.double().clone()
        for name, b in head.named_buffers():
            state[f"{i}.{name}"] = b.double().clone()
    return state


@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("training", [True, False])
def test_fused_heads_equal_the_head_modules_one_by_one(num_heads, training):
    """Forward, backward (input and every parameter) and the BN running statistics of
    ``fused_heads`` against ``torch.stack([head(fmap) ...])``, in float64 so that any difference
    beyond rounding shows; a random upstream gradient, random BN statistics and affine parameters,
    and a 4x4 map (ResNet-18 at 112 px) so that the convolutions' padding matters."""
    from ferflow.model import fused_heads, fusable

    torch.manual_seed(0)
    model = DAN("resnet18", num_heads=num_heads)
    _randomise_bn_stats(model)
    fused = [h.double().train(training) for h in model.head_modules()]
    for h in fused:  # non-zero biases, so that a bias sent to the wrong head shows
        for m in h.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.data.normal_(0, 0.1)
    ref = [copy.deepcopy(h) for h in fused]
    before = _head_state_buffers(ref)
    assert fusable(fused)
    fmap = torch.randn(4, 512, 4, 4, dtype=torch.float64)
    upstream = torch.randn(4, num_heads, 512, dtype=torch.float64)
    outs, grads = [], []
    for heads, run in ((fused, lambda x: fused_heads(heads, x)),
                       (ref, lambda x: torch.stack([h(x) for h in ref], dim=1))):
        x = fmap.clone().requires_grad_()
        out = run(x)
        (out * upstream).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    assert outs[0].shape == (4, num_heads, 512)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    got, want = _head_state(fused), _head_state(ref)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)
    batches = [b for k, b in got.items() if k.endswith("num_batches_tracked")]
    assert len(batches) == 5 * num_heads and all(b == int(training) for b in batches)
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], want[k])]
    assert len(moved) == (5 * num_heads if training else 0)  # so the comparison is not vacuous


def test_fused_model_matches_per_head_model_in_a_training_step():
    """The whole model in float32, as trained: outputs, DANLoss gradients and the BN statistics
    after a training-mode forward, with the heads fused (default) and one by one
    (``fuse_heads = False``). Float32 rounding differs between the two orders of summation (~1e-6
    of a value, amplified by the training-mode BNs): per tensor within 1e-4 of its largest value.
    (No optimiser step: Adam scales the rounding noise of gradients that are zero in exact
    arithmetic, such as a conv bias before a training-mode BN, up to full-size updates.)"""
    torch.manual_seed(0)
    fused = DAN("resnet18", num_heads=4).train()
    ref = copy.deepcopy(fused)
    ref.fuse_heads = False
    criterion = DANLoss(task="both")
    images = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8)
    expr = torch.tensor([0, 3, -1, 7])
    va = torch.rand(4, 2) * 2 - 1
    results = []
    for model in (fused, ref):
        out = model(images)
        copy.deepcopy(criterion)(out, expr, va)[0].backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out, grads, model.state_dict()))
    (out_f, grads_f, state_f), (out_r, grads_r, state_r) = results

    def close(a, b, what):
        scale = max(b.abs().max().item(), 1e-3)
        assert (a.double() - b.double()).abs().max().item() <= 1e-4 * scale, what

    for name in DANOutput._fields:
        close(getattr(out_f, name), getattr(out_r, name), name)
    assert list(grads_f) == list(grads_r)
    for name in grads_r:
        close(grads_f[name], grads_r[name], f"grad {name}")
    assert list(state_f) == list(state_r)
    for name in state_r:
        close(state_f[name], state_r[name], name)


def test_heads_fall_back_to_the_modules_when_a_bn_differs():
    from ferflow.model import fusable

    model = DAN("resnet18", num_heads=2)
    assert fusable(model.head_modules())
    model.cat_head1.sa.conv_3x3[1].momentum = None  # cumulative average: the fused BN cannot do it
    assert not fusable(model.head_modules())
    model.cat_head1.sa.conv_3x3[1].momentum = 0.1
    model.cat_head0.ca.attention[1].eval()
    assert not fusable(model.head_modules())
    model.cat_head0.ca.attention[1].train()
    assert fusable(model.head_modules())
    # a head replaced by a torch.fx graph (as ferflow.inference.fold_batchnorm does) runs as it is
    model.cat_head1 = torch.fx.symbolic_trace(model.cat_head1)
    assert not fusable(model.head_modules())
    model.eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        fmap = model.features(model.normalize(x))
        want = torch.stack([model.cat_head0(fmap), model.cat_head1(fmap)], dim=1)
        torch.testing.assert_close(model.run_heads(fmap), want, rtol=0, atol=0)
