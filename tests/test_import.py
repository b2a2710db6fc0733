"""Foreign CIFAR checkpoints: each layout is rebuilt here as its own code defines it, saved as those codebases
save it, imported with `sglr-zoo import`, and must give the same logits (the same bits, but for the order in which
the final average pooling sums)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sglr_zoo
from sglr_zoo.cli import main
from sglr_zoo.errors import UserError
from sglr_zoo.models.convert import NORMALIZATIONS, import_checkpoint, parse_normalization, save_imported

# --- The foreign layouts, as in the SGLR authors' code (github.com/devicerxx/SGLS, models/), which copies kuangliu's
# pytorch-cifar and TRADES' WideResNet, and as in RobustBench's model_zoo/architectures. Widths are parameters
# here so that tiny versions match our tiny test architectures; names and forward passes are the originals'.

class KLBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class KLResNet(nn.Module):
    def __init__(self, num_blocks, widths, num_classes=10):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(widths[3], num_blocks[3], stride=2)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for stride in [stride] + [1] * (num_blocks - 1):
            layers.append(KLBasicBlock(self.in_planes, planes, stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class KLPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class KLPreActResNet(nn.Module):
    def __init__(self, num_blocks, widths, num_classes=10, final_bn=True):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(widths[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(widths[3], num_blocks[3], stride=2)
        self.final_bn = final_bn  # RobustBench's PreActResNet(bn_before_fc=False) has no final bn
        if final_bn:
            self.bn = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for stride in [stride] + [1] * (num_blocks - 1):
            layers.append(KLPreActBlock(self.in_planes, planes, stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.final_bn:
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class TradesBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                                                                padding=0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[TradesBlock(i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1)
                                     for i in range(int(nb_layers))])

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    def __init__(self, depth=34, num_classes=10, widen_factor=10, sub_block1=False):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) / 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        if sub_block1:  # RobustBench keeps it to load TRADES-era checkpoints; forward never uses it
            self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.view(-1, self.nChannels))


class ImageNormalizer(nn.Module):  # RobustBench's utils_architectures.ImageNormalizer (persistent buffers)
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def normalize_model(model, mean, std):  # RobustBench's utils_architectures.normalize_model
    return nn.Sequential(OrderedDict([("normalize", ImageNormalizer(mean, std)), ("model", model)]))


class MuSigmaResNet(KLResNet):  # RobustBench's model classes, e.g. Wong2020FastNet: mu/sigma buffers in the network
    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("mu", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return super().forward((x - self.mu) / self.sigma)


TINY = dict(num_blocks=(1, 1, 1, 1), widths=(8, 8, 16, 16))
CIFAR10 = NORMALIZATIONS["cifar10"]


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a mis-mapped BN changes the logits."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.data.copy_(1 + 0.1 * torch.randn(shape, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))
    return model.eval()


def _save(obj, path):
    torch.save(obj, path)
    return path


# (what is saved, as which file, imported as which arch with which normalisation)
LAYOUTS = {
    # The SGLR authors' main_adv.py: {'epoch', 'state_dict', 'optim_dict', 'best_prec1'} in checkpoint_best.tar,
    # DataParallel's module. prefix when several GPUs trained it.
    "sgls_resnet_tiny": (lambda: KLResNet(**TINY), "resnet_tiny_cifar", "none", "sgls"),
    "sgls_preact_tiny": (lambda: KLPreActResNet(**TINY), "preactresnet_tiny_cifar", "none", "sgls_dataparallel"),
    "sgls_wrn_tiny": (lambda: TradesWideResNet(depth=10, widen_factor=1), "wrn_tiny_cifar", "none", "sgls"),
    # The authors' full-size ResNet-18 and PreActResNet-18, as plain state dicts.
    "sgls_resnet18": (lambda: KLResNet((2, 2, 2, 2), (64, 128, 256, 512)), "resnet18_cifar", "none", "plain"),
    "sgls_preactresnet18": (lambda: KLPreActResNet((2, 2, 2, 2), (64, 128, 256, 512)), "preactresnet18_cifar",
                            "none", "plain"),
    # RobustBench: normalize_model(WideResNet(sub_block1=True)), and mu/sigma buffers in the model class.
    "robustbench_wrn_normalized": (
        lambda: normalize_model(TradesWideResNet(depth=10, widen_factor=1, sub_block1=True), *CIFAR10),
        "wrn_tiny_cifar", "cifar10", "plain"),
    "robustbench_resnet_mu_sigma": (lambda: MuSigmaResNet(*CIFAR10, **TINY), "resnet_tiny_cifar", "cifar10",
                                    "safetensors"),
}


def _write(kind: str, model: nn.Module, folder) -> str:
    state = model.state_dict()
    if kind == "sgls":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return str(_save({"epoch": 3, "state_dict": state, "optim_dict": optimizer.state_dict(), "best_prec1": 41.5},
                         folder / "checkpoint_best.tar"))
    if kind == "sgls_dataparallel":
        return str(_save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
                         folder / "checkpoint_best.tar"))
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        return str(folder / "model.safetensors")
    return str(_save(state, folder / "model.pt"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_foreign_checkpoint_imports_with_identical_logits(layout, tmp_path, monkeypatch):
    build, arch, normalization, kind = LAYOUTS[layout]
    torch.manual_seed(0)
    foreign = _randomize(build())
    path = _write(kind, foreign, tmp_path)
    x = torch.rand(4, 3, 32, 32)
    main(["import", path, "--arch", arch, "--normalization", normalization, "--out", str(tmp_path / "imported")])
    model = sglr_zoo.load(str(tmp_path / "imported"))
    with torch.no_grad():
        ours, theirs = model(x), foreign(x)
        # Their F.avg_pool2d(out, 4) and our global average pooling sum the same 16 (WRN: 64) values in another
        # order: float32 rounding apart. With the same pooling, every other operation gives the same bits.
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert torch.equal(ours.argmax(1), theirs.argmax(1))
        monkeypatch.setattr(F, "avg_pool2d", lambda out, kernel: F.adaptive_avg_pool2d(out, 1))
        assert torch.equal(ours, foreign(x))
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert config["architecture"] == arch and config["sglr_zoo_import"]["normalization"] == normalization
    if layout == "robustbench_wrn_normalized":
        assert any(k.startswith("sub_block1.") for k in config["sglr_zoo_import"]["dropped_keys"])


def test_imported_model_evaluates_as_its_own_code_does(tmp_path, tiny_dataset):
    """`sglr-zoo eval` of the import gives the numbers the foreign model gives under the same evaluator."""
    from sglr_zoo.data import load_splits, to_float
    from sglr_zoo.evaluate import evaluate, evaluate_model
    from sglr_zoo.recipe import DataConfig

    torch.manual_seed(0)
    foreign = _randomize(normalize_model(KLPreActResNet(**TINY), *CIFAR10))
    path = _write("plain", foreign, tmp_path)
    main(["import", path, "--arch", "preactresnet_tiny_cifar", "--normalization", "cifar10",
          "--out", str(tmp_path / "imported")])
    options = dict(attacks=["clean", "pgd5"], seed=0, device="cpu")
    ours = evaluate_model(str(tmp_path / "imported"), dataset=str(tiny_dataset), n=16, **options)
    test = load_splits(DataConfig(dataset=str(tiny_dataset), n_test=16, n_train=1)).test
    theirs = evaluate(foreign, to_float(test.images, 32), test.labels, num_classes=10, **options)
    assert ours.clean_accuracy == theirs.clean_accuracy
    assert ours.robust_accuracy == theirs.robust_accuracy


def test_normalization_must_be_right_for_the_logits(tmp_path):
    """The weights do not say how inputs were normalised: the stated normalisation is what the model applies."""
    torch.manual_seed(0)
    foreign = _randomize(normalize_model(KLResNet(**TINY), *CIFAR10))
    path = _write("plain", foreign, tmp_path)
    imported = import_checkpoint(path, "resnet_tiny_cifar", "none")
    assert imported.checkpoint_normalization["normalize.mean"] == pytest.approx(list(CIFAR10[0]))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(imported.model(x), foreign(x))


@pytest.mark.parametrize("text, expected", [
    ("none", None),
    ("cifar10", CIFAR10),
    ("0.5,0.25", ((0.5,) * 3, (0.25,) * 3)),
    ("0.1,0.2,0.3,0.4,0.5,0.6", ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))),
])
def test_parse_normalization(text, expected):
    assert parse_normalization(text) == expected


@pytest.mark.parametrize("text", ["imagenet", "0.5", "0.5,0", "1,2,3,4", "a,b", "nan,1", "0.5,nan", "inf,0.5",
                                  "0.5,-inf", "128,64", "0.5,2", "-0.1,0.5", "0.5,0.5,0.5,0.2,0.2,nan"])
def test_bad_normalization_is_refused(text):
    with pytest.raises(UserError, match="--normalization") as info:
        parse_normalization(text)
    assert "\n" not in str(info.value)


def test_checkpoint_of_another_architecture_names_the_first_mismatch(tmp_path):
    path = _write("plain", KLResNet((1, 1, 1, 1), (8, 16, 16, 16)), tmp_path)
    with pytest.raises(UserError, match=r"stages\.1\.0\.conv1\.weight has shape \(16, 8, 3, 3\) in the checkpoint "
                                        r"but \(8, 8, 3, 3\)"):
        import_checkpoint(path, "resnet_tiny_cifar", "none")


def test_robustbench_preact_without_final_bn_is_refused(tmp_path):
    """RobustBench's default PreActResNet computes something else (no final bn): strict loading catches it."""
    path = _write("plain", KLPreActResNet(**TINY, final_bn=False), tmp_path)
    with pytest.raises(UserError, match=r"missing key bn\.weight"):
        import_checkpoint(path, "preactresnet_tiny_cifar", "none")


class _Shell:
    """Pickles as a call of os.system: what an attacker's checkpoint holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("extra", ["function", "os.system"])
def test_pickle_with_code_is_refused_in_our_words(extra, tmp_path):
    """Refused before anything runs, with our reason and advice, never torch's hint that weights_only=False "will
    likely succeed" (advice a user must not take for a file from elsewhere)."""
    path, marker = tmp_path / "model.pth", tmp_path / "ran"
    code = {"args": OrderedDict, "make": F.relu} if extra == "function" else {"hook": _Shell(marker)}
    torch.save({"state_dict": KLResNet(**TINY).state_dict(), **code}, path)
    with pytest.raises(UserError, match=r"refused: the file holds more than tensors \(it names [\w.]+\), and loading "
                                        "it could run code. Ask its author for the weights as safetensors") as info:
        import_checkpoint(path, "resnet_tiny_cifar", "none")
    message = str(info.value)
    assert "weights_only" not in message and "likely succeed" not in message and "\n" not in message
    assert not marker.exists()


def _stride0(n: int) -> torch.Tensor:
    """n float32 values that torch.save stores as one: a stride-0 view asking for 4 n bytes once loaded."""
    return torch.zeros(1).expand(n)


# (where the expanded tensor sits, how the file is saved)
EXPANDED = {
    "an extra key": (lambda state: {**state, "extra": _stride0(2**34)}, {}),  # 64 GiB asked by a 70 KB file
    "beside the state dict": (lambda state: {"state_dict": state, "ema": _stride0(2**34)}, {}),
    "a weight": (lambda state: {**state, "linear.weight": torch.zeros(1).expand_as(state["linear.weight"])}, {}),
    "a normalisation buffer": (lambda state: {**state, "mu": _stride0(2**20)}, {}),  # flattened by the old import
    "legacy format": (lambda state: {**state, "extra": _stride0(2**34)}, {"_use_new_zipfile_serialization": False}),
}


@pytest.mark.parametrize("case", EXPANDED)
def test_tensors_asking_for_more_than_their_stored_data_are_refused(case, tmp_path):
    """A tensor whose shape asks for more than its storage holds is refused from its shape alone, before any of
    it is allocated."""
    change, options = EXPANDED[case]
    path = tmp_path / "model.pt"
    torch.save(change(KLResNet(**TINY).state_dict()), path, **options)
    assert path.stat().st_size < 200_000
    with pytest.raises(UserError, match=r"model.pt: refused: tensor [\w.]+ has shape \(.*\) \([\d,]+ bytes\) but only "
                                        r"\d+ bytes of stored data \(an expanded or stride-0 view\)") as info:
        import_checkpoint(path, "resnet_tiny_cifar", "none")
    assert "\n" not in str(info.value)


def test_views_of_one_storage_and_the_legacy_format_import(tmp_path):
    """What real checkpoints hold stays accepted: tensors sharing a storage, files saved before PyTorch 1.6."""
    torch.manual_seed(0)
    foreign = _randomize(KLResNet(**TINY))
    flat = torch.randn(100)
    x = torch.rand(2, 3, 32, 32)
    for name, obj, options in [
        ("views.pt", {"state_dict": foreign.state_dict(), "flat": flat, "a": flat[:50], "b": flat[50:]}, {}),
        ("legacy.pt", {"state_dict": foreign.state_dict()}, {"_use_new_zipfile_serialization": False}),
    ]:
        torch.save(obj, tmp_path / name, **options)
        with torch.no_grad():
            assert torch.allclose(import_checkpoint(tmp_path / name, "resnet_tiny_cifar", "none").model(x),
                                  foreign(x), atol=1e-5)


@pytest.mark.parametrize("key, value", [("linear.weight", float("nan")), ("layer1.0.conv1.weight", float("inf")),
                                        ("bn1.running_var", float("-inf"))])
def test_non_finite_weights_are_refused(key, value, tmp_path):
    state = KLResNet(**TINY).state_dict()
    state[key].view(-1)[3] = value
    path = _save(state, tmp_path / "model.pt")
    with pytest.raises(UserError, match=rf"model.pt: refused: {re.escape(key)} holds 1 NaN or infinite value"):
        import_checkpoint(path, "resnet_tiny_cifar", "none")


@pytest.mark.parametrize("name, content, message", [
    ("weights.pkl", b"anything", "unknown checkpoint type '.pkl'"),
    ("weights.pt", b"not a torch file", "not a readable torch.save file"),
    ("empty.pt", b"", "not a readable torch.save file \\(it ends early\\)"),
    ("pickle.pt", pickle.dumps({"a": 1}, protocol=2), "not a readable torch.save file"),
    ("weights.safetensors", b"garbage", "not a readable safetensors file"),
])
def test_unreadable_files_are_refused(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        import_checkpoint(tmp_path / name, "resnet_tiny_cifar", "none")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_checkpoint_that_is_not_a_file_is_refused(kind, tmp_path):
    """A FIFO would wait for a writer forever; a folder is not a checkpoint."""
    path = tmp_path / "model.pt"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(UserError, match=r"model.pt: not a regular file \((a FIFO|a folder)\)"):
        import_checkpoint(path, "resnet_tiny_cifar", "none")


def test_import_cli_errors_exit_2(tmp_path, capsys):
    path = _write("plain", KLResNet(**TINY), tmp_path)
    for argv, message in [
        (["import", path, "--arch", "resnet18", "--normalization", "none", "--out", str(tmp_path / "a")],
         "our CIFAR architectures"),
        (["import", path, "--arch", "resnet_tiny_cifar", "--out", str(tmp_path / "b")], "--normalization"),
        (["import", path, "--arch", "resnet_tiny_cifar", "--normalization", "none", "--out", str(tmp_path)],
         "not an empty folder"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_save_imported_records_the_source(tmp_path):
    path = _write("plain", KLResNet(**TINY), tmp_path)
    imported = import_checkpoint(path, "resnet_tiny_cifar", "none")
    folder = save_imported(imported, tmp_path / "out", source_name="model.pt")
    record = json.loads((folder / "config.json").read_text())["sglr_zoo_import"]
    assert record["source"] == "model.pt" and len(record["source_sha256"]) == 64


def test_full_disk_while_importing_is_one_line(tmp_path, monkeypatch):
    def full(model, folder, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{folder}/model.safetensors")

    imported = import_checkpoint(_write("plain", KLResNet(**TINY), tmp_path), "resnet_tiny_cifar", "none")
    monkeypatch.setattr(timm.models, "save_for_hf", full)
    with pytest.raises(UserError, match=r"could not write .*out/model.safetensors: the disk is full"):
        save_imported(imported, tmp_path / "out", source_name="model.pt")


def test_card_of_an_import_names_its_source(tmp_path):
    from sglr_zoo.export import export_folder

    path = _write("plain", KLResNet(**TINY), tmp_path)
    folder = save_imported(import_checkpoint(path, "resnet_tiny_cifar", "cifar10"), tmp_path / "imported",
                           source_name="model.pt")
    card = (export_folder(folder, tmp_path / "export") / "README.md").read_text()
    digest = json.loads((folder / "config.json").read_text())["sglr_zoo_import"]["source_sha256"]
    assert "imported with `sglr-zoo import` from `model.pt`" in card and digest in card and "`cifar10`" in card
