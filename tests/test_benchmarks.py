"""The benchmark scripts' own measurements."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def train_throughput():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_shares_split_a_step_by_kind_of_operation(train_throughput):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 32 * 32, 10))

    def step(images, labels, index, timings):
        nn.functional.cross_entropy(model(images.float() / 255), labels).backward()

    shares = train_throughput.op_shares(step, batch=8, steps=2)
    assert list(shares) == ["convolution", "batch norm", "relu", "other aten", "not aten"]
    assert all(0 <= share <= 1 for share in shares.values()) and sum(shares.values()) == pytest.approx(1, abs=0.02)
    assert shares["convolution"] > 0 and shares["batch norm"] > 0 and shares["relu"] > 0
    assert shares["other aten"] > 0  # the linear layer, the loss


def test_fixed_batch_is_the_same_every_call(train_throughput):
    first, second = train_throughput.fixed_batch(4), train_throughput.fixed_batch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert first[0].dtype == torch.uint8 and first[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("method", ["sglr", "trades"])
def test_our_step_is_the_trainers(train_throughput, fresh_accelerate, monkeypatch, method):
    """The benchmark times `sglr_zoo.loop.train_step` itself, not a copy of it, and the attack's share of it."""
    import sglr_zoo.loop

    real, calls = sglr_zoo.loop.train_step, []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sglr_zoo.loop, "train_step", counted)
    levers = {"mixed_precision": "no", "channels_last": False, "compile": False, "keep_freed_memory": False,
              "threads": 1, "freeze": False}
    our_step, resolved = train_throughput.make_our_step("preactresnet_tiny_cifar", levers, method, 4, 1)
    assert resolved["freeze"] is False and resolved["mixed_precision"] == "no"
    timings = []
    our_step(*train_throughput.fixed_batch(4), timings)
    assert calls == [{"epoch": 1, "lr": 0.01, "freeze": False}]
    ((attack_s, rest_s),) = timings
    assert attack_s > 0 and rest_s > 0
