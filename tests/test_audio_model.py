"""The audio model: float32 frontend under autocast, 1-channel stems, cached pretrained weights, save/load."""

import os

import pytest
import torch
import torchvision
from audio_model import (
    AudioClassifier,
    TinyMapConv2d,
    build_backbone,
    frontend_config,
    probe_step,
    save_model,
    supported_models,
    use_tiny_map_convs,
)
from audio_predictor import load_model
from torch import nn

CONFIG = {"model": "resnet18", "labels": ["a", "b", "c"], **frontend_config(8000, 0.5, 32)}


def test_frontend_is_float32_under_bf16_autocast_and_independent_of_the_batch():
    model = AudioClassifier(CONFIG).eval()
    waves = torch.randn(4, 4000) * torch.tensor([[1.0], [0.1], [0.01], [0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.frontend(waves)
        logits = model(waves)
    assert features.dtype == torch.float32 and features.shape == (4, 1, 32, 51)
    assert logits.dtype == torch.bfloat16 and logits.shape == (4, 3)
    # the dB floor is per clip: a clip's features do not depend on the loudest clip beside it
    assert torch.allclose(model.frontend(waves[1:2]), features[1:2], atol=1e-4)


def test_int16_and_float_waveforms_give_the_same_features():
    frontend = AudioClassifier(CONFIG).frontend
    waves = torch.rand(2, 4000) - 0.5
    pcm = (waves * 32768).round().to(torch.int16)
    assert torch.allclose(frontend.log_mel(pcm), frontend.log_mel(pcm.float() / 32768))


def test_specaugment_only_in_training():
    model = AudioClassifier(CONFIG, freq_mask=8, time_mask=10)
    model.frontend.fit_normalisation(torch.randn(8, 4000))
    waves = torch.randn(2, 4000)
    masked = model.frontend.train()(waves)
    clean = model.frontend.eval()(waves)
    assert (masked == 0).sum() > (clean == 0).sum()
    assert torch.equal(clean, model.frontend(waves))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"])
def test_any_torchvision_classifier_gets_a_one_channel_stem(name):
    model = build_backbone(name, 5).eval()
    assert model(torch.randn(2, 1, 32, 51)).shape == (2, 5)


def test_unknown_model_name():
    with pytest.raises(SystemExit, match="not a torchvision classification model"):
        build_backbone("resnet19", 3)


@pytest.mark.parametrize("name", ["inception_v3", "googlenet", "vit_b_16", "maxvit_t"])
def test_classifiers_that_cannot_take_a_log_mel_are_refused_with_the_supported_list(name, monkeypatch):
    monkeypatch.setattr(torchvision.models, "get_model", lambda *a, **k: pytest.fail(f"built {name}"))
    with pytest.raises(
        SystemExit, match=rf"--model {name}: needs a fixed image size .*choose one of alexnet, .*resnet18, .*swin_t"
    ):
        build_backbone(name, 3)
    assert not any(n.startswith(("vit_", "inception", "googlenet", "maxvit")) for n in supported_models())


def test_pretrained_weights_file_holding_code_is_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / torchvision.models.ResNet18_Weights.DEFAULT.url.split("/")[-1]
    cached.parent.mkdir()
    torch.save({"conv1.weight": Payload()}, cached)
    with pytest.raises(SystemExit, match=rf"{cached} is not a plain weights file .*delete it and download"):
        build_backbone("resnet18", 3, pretrained=True)
    assert not marker.exists()


def test_pretrained_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(SystemExit, match=rf"expected {tmp_path}/checkpoints/resnet18-[0-9a-f]+\.pth"):
        build_backbone("resnet18", 3, pretrained=True)
    imagenet = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(imagenet.state_dict(), tmp_path / "checkpoints" / url.split("/")[-1])
    model = build_backbone("resnet18", 3, pretrained=True)
    assert torch.allclose(model.conv1.weight, imagenet.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


def test_saved_model_takes_raw_waveforms(tmp_path):
    model = AudioClassifier(CONFIG)
    model.frontend.fit_normalisation(torch.randn(8, 4000))
    model.eval()
    save_model(tmp_path / "model", model, {"task": "audio-classification", **CONFIG})
    loaded, config = load_model(tmp_path / "model")
    waves = torch.randn(3, 4000)
    assert config["labels"] == ["a", "b", "c"] and config["task"] == "audio-classification"
    assert torch.allclose(loaded(waves), model(waves), atol=1e-5)


def test_batch_size_auto_is_accepted_and_starts_from_the_nominal_batch_on_cpu(tmp_path):
    import train_audio
    from accelerate import Accelerator

    from shared.runtime import largest_batch_size

    args = train_audio.parse_args(["--data", "x", "--output-dir", "y", "--batch-size", "auto", "--nominal-batch-size", "48"])
    assert args.batch_size == "auto"
    assert largest_batch_size(Accelerator(cpu=True), 48, probe_step(CONFIG)) == 48
    with pytest.raises(SystemExit):
        train_audio.parse_args(["--data", "x", "--output-dir", "y", "--batch-size", "0"])


@pytest.mark.parametrize(
    "conv, size",
    [
        (dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, bias=False), (2, 4)),
        (dict(in_channels=16, out_channels=24, kernel_size=3, stride=2, padding=1, bias=True), (4, 7)),
        (dict(in_channels=16, out_channels=8, kernel_size=(1, 3), dilation=2, padding=(0, 2)), (1, 8)),
        (dict(in_channels=16, out_channels=24, kernel_size=1, stride=2, bias=False), (3, 5)),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_map_convolution_is_one_matmul_with_the_stock_results(conv, size, channels_last, monkeypatch):
    torch.manual_seed(0)
    stock = nn.Conv2d(**conv)
    tiny = TinyMapConv2d(**conv)
    tiny.load_state_dict(stock.state_dict())
    x = torch.randn(3, 16, *size)
    if channels_last:  # as the audio script runs it: weights and inputs (N, H, W, C) in memory
        x = x.contiguous(memory_format=torch.channels_last)
        stock, tiny = stock.to(memory_format=torch.channels_last), tiny.to(memory_format=torch.channels_last)
    x_stock, x_tiny = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = stock(x_stock)
    expected.square().sum().backward()

    def no_stock_kernel(*args, **kwargs):
        raise AssertionError("a map this small must not reach the stock convolution")

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_stock_kernel)
    out = tiny(x_tiny)
    out.square().sum().backward()
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(x_tiny.grad, x_stock.grad, atol=1e-4)
    for name, p in stock.named_parameters():
        assert torch.allclose(dict(tiny.named_parameters())[name].grad, p.grad, atol=1e-4), name


def test_larger_maps_keep_the_stock_convolution_and_the_classifier_keeps_resnet_names(monkeypatch):
    calls = []
    stock_conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or stock_conv2d(*a, **k))
    TinyMapConv2d(4, 4, 3, padding=1)(torch.randn(1, 4, 3, 3))  # 9 positions
    assert calls == [1]
    model = AudioClassifier(CONFIG)
    assert type(model.backbone.layer4[0].conv1) is torch.nn.Conv2d  # built plain: the CPU speed-up is opt-in
    use_tiny_map_convs(model)
    assert type(model.backbone.layer4[0].conv1) is TinyMapConv2d
    model.backbone.load_state_dict(build_backbone("resnet18", 3).state_dict())


def test_tiny_map_convolutions_compile_to_the_same_results():
    """--compile traces TinyMapConv2d's Python; the compiled block must compute what the eager one does."""
    torch.manual_seed(0)
    block = nn.Sequential(TinyMapConv2d(16, 24, 3, padding=1, bias=False), nn.ReLU(), TinyMapConv2d(24, 8, 1, stride=2))
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 2, 4).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(block)
    outputs, grads = [], []
    for model in (block, compiled):
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in block.parameters()])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for eager, comp in zip(*grads, strict=True):
        assert torch.allclose(eager, comp, atol=1e-4)
