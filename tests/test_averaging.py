"""Weight averaging: the average's arithmetic, its start, and a run that monitors, exports and resumes it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save
from torch import nn

import sglr_zoo
from sglr_zoo.averaging import Averaging, WeightAverage
from sglr_zoo.cards import render_card
from sglr_zoo.rundir import RunDir
from sglr_zoo.runstate import RunState
from sglr_zoo.schedule import Plan, Plans
from sglr_zoo.source import collect
from tests.test_training import TINY, make_recipe, run_train, weights_equal

pytestmark = pytest.mark.usefixtures("fresh_accelerate", "one_thread")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()


def shifted(model: nn.Module) -> None:
    """Moves every parameter and BatchNorm statistic, as a step and a training forward would."""
    with torch.no_grad():
        for tensor in [*model.parameters(), model[1].running_mean, model[1].running_var]:
            tensor.add_(torch.randn_like(tensor))
        model[1].num_batches_tracked += 3


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_an_average_moves_by_one_minus_decay(buffers):
    model = small_model()
    model(torch.rand(1, 3, 5, 5))  # materialises the lazy layer
    average = WeightAverage(model, decay=0.75, buffers=buffers)
    before = {name: value.clone() for name, value in average.module.state_dict().items()}
    shifted(model)
    average.update_to(model)
    after, now = average.module.state_dict(), model.state_dict()
    averaged = {name for name, _ in model.named_parameters()} | ({"1.running_mean", "1.running_var"}
                                                                  if buffers == "average" else set())
    for name, value in after.items():
        expected = 0.75 * before[name] + 0.25 * now[name] if name in averaged else now[name]
        assert torch.allclose(value, expected.to(value.dtype)), name
    assert after["1.num_batches_tracked"] == now["1.num_batches_tracked"]  # integers are copied


def test_the_average_copies_the_weights_until_its_start():
    """Plans of 10 steps in one epoch and `start: 0.5`: after steps 1-4 the average is the weights; from step 5 on
    it moves by 1 - decay."""
    model = small_model()
    model(torch.rand(1, 3, 5, 5))
    average = WeightAverage(model, decay=0.5)
    callback, state = Averaging(average, model, Plans([Plan(0, 1, 10, 1)], 10), start=0.5), RunState()
    for step in range(1, 8):
        previous = average.module[0].weight.clone()
        shifted(model)
        state.global_step = step
        callback.on_step_end(state, None)
        expected = model[0].weight if step < 5 else 0.5 * previous + 0.5 * model[0].weight
        assert torch.allclose(average.module[0].weight, expected), step


def in_old_layout(checkpoint: Path) -> None:
    """Rewrites `checkpoint`'s average as sglr-zoo wrote it before 2026-12-06 (timm's ModelEmaV3 keys, "module.*"),
    with its manifest entry."""
    data = save({f"module.{name}": value for name, value in load_file(checkpoint / "average.safetensors").items()})
    (checkpoint / "average.safetensors").write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["average.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_a_run_monitors_exports_and_resumes_its_average(tmp_path, tiny_dataset):
    """With `average.decay` on, last/ and best/ hold the average (saved in each checkpoint, not the trained
    weights), run.json says so, and a run stopped by run.max_steps inside an epoch ends bit for bit as an
    uninterrupted one."""
    overrides = ["average.decay=0.9", "average.start=0.25", "data.val_size=16", "schedule.epochs=3"]
    reference = RunDir(run_train(make_recipe(TINY, tiny_dataset, tmp_path / "a", *overrides)))
    checkpoint = reference.checkpoint(3)
    average = load_file(checkpoint / "average.safetensors")
    loaded = sglr_zoo.load("preactresnet_tiny_cifar", weights=checkpoint / "average.safetensors", num_classes=10)
    assert all(torch.equal(loaded.state_dict()[name], average[name]) for name in average)  # as `--weights` loads it
    exported, trained = load_file(reference.export("last") / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert exported.keys() == average.keys() == trained.keys()
    assert all(torch.equal(exported[name], average[name]) for name in exported)
    assert not all(torch.equal(trained[name], average[name]) for name in trained)
    described = json.loads(reference.run_info.read_text())["weights"]
    assert described.startswith("exponential moving average of the weights, decay 0.9 per step, from 25% of the run")
    assert described in str(render_card(collect(reference.root)))

    stopped = make_recipe(TINY, tiny_dataset, tmp_path / "b", *overrides, "run.max_steps=7")  # 3 steps an epoch
    run = RunDir(run_train(stopped))
    in_old_layout(run.checkpoint(3))  # the stop's, in the layout before 2026-12-06: it still resumes
    run_train(make_recipe(TINY, tiny_dataset, tmp_path / "b", *overrides))
    for which in ("last", "best"):
        assert weights_equal(reference.export(which), run.export(which)), which
