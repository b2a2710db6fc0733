"""Training objectives against hand computations from shared/SGLR.md: the SGLR bank update and soft CE, TRADES."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from sglr_zoo.objectives import PGDAT, SGLR, TRADES, build_objective, soft_cross_entropy, trades_kl
from sglr_zoo.recipe import MethodConfig, from_dict

K = 4  # classes
LABELS = torch.tensor([0, 2, 1, 3, 2])  # the training set's labels, in index order
INDEX = torch.tensor([3, 0, 4])  # the batch: examples 3, 0 and 4
Y = LABELS[INDEX]


class LinearModel(nn.Module):
    """A 'model' that is one Linear layer on the flattened input (no mode-dependent layers)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(6, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture
def model():
    return LinearModel().train()


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 2, 3, generator=generator)
    x_adv = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    return x, x_adv


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = z.double().exp()
    return e / e.sum(1, keepdim=True)


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - z.exp().sum(1, keepdim=True).log()


def onehot(y: torch.Tensor) -> torch.Tensor:
    return torch.eye(K, dtype=torch.float64)[y]


def soft_bank() -> torch.Tensor:
    """Old soft labels t_old for the 5 examples (rows sum to 1), so the EMA is not from one-hot."""
    generator = torch.Generator().manual_seed(2)
    return torch.rand(len(LABELS), K, generator=generator).softmax(1)


def sglr(start_epoch: int = 1, trades: bool = False, model: nn.Module | None = None, **cfg) -> SGLR:
    config = MethodConfig(name="sglr_trades" if trades else "sglr", **cfg)
    return SGLR(config, LABELS, K, start_epoch, model=model, trades=trades)


# (r_hard, temperature)
SGLR_CASES = [(0.0, 1.0), (0.3, 1.0), (0.0, 2.0), (0.3, 2.0)]


@pytest.mark.parametrize("r_hard, temperature", SGLR_CASES)
def test_sglr_bank_update_and_loss(model, inputs, r_hard, temperature):
    x, x_adv = inputs
    objective = sglr(alpha=0.9, adv_weight=0.8, temperature=temperature, r_hard=r_hard)
    t_old = soft_bank()
    objective.write_bank(torch.arange(len(LABELS)), t_old)

    out = objective(model, x, x_adv, Y, INDEX, epoch=1)

    with torch.no_grad():
        adv, clean = model(x_adv), model(x)
    t = 0.9 * t_old[INDEX].double() + 0.1 * (0.8 * softmax(adv / temperature) + 0.2 * softmax(clean / temperature))
    target = r_hard * onehot(Y) + (1 - r_hard) * t
    loss = (-(target * log_softmax(adv)).sum(1)).mean()

    assert torch.equal(out["bank_index"], INDEX)
    torch.testing.assert_close(out["bank_targets"].double(), t, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["bank_targets"].sum(1), torch.ones(3), rtol=0, atol=1e-6)
    assert out["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    assert out["ce"].item() == pytest.approx(loss.item(), abs=1e-6)
    assert out["target_confidence"].item() == pytest.approx(target.gather(1, Y[:, None]).mean().item(), abs=1e-6)
    torch.testing.assert_close(out["logits"], adv)
    assert out["loss"].requires_grad  # the loss trains the model; the target does not
    assert not out["bank_targets"].requires_grad

    # The loop writes the update (after gathering it); other examples keep their labels.
    objective.write_bank(out["bank_index"], out["bank_targets"])
    torch.testing.assert_close(objective.bank[INDEX].double(), t, rtol=0, atol=1e-6)
    untouched = [i for i in range(len(LABELS)) if i not in INDEX.tolist()]
    assert torch.equal(objective.bank[untouched], t_old[untouched])


def test_sglr_first_update_from_onehot(model, inputs):
    """The bank starts at one_hot(y): the first refined label keeps alpha on the hard label."""
    x, x_adv = inputs
    objective = sglr()
    assert torch.equal(objective.bank, F.one_hot(LABELS, K).float())
    out = objective(model, x, x_adv, Y, INDEX, epoch=1)
    with torch.no_grad():
        mix = 0.8 * softmax(model(x_adv)) + 0.2 * softmax(model(x))
    torch.testing.assert_close(out["bank_targets"].double(), 0.9 * onehot(Y) + 0.1 * mix, rtol=0, atol=1e-6)


@pytest.mark.parametrize("epoch, refined", [(1, False), (4, False), (5, True), (6, True)])
def test_start_epoch_switch(model, inputs, epoch, refined):
    x, x_adv = inputs
    objective = sglr(start_epoch=5)
    out = objective(model, x, x_adv, Y, INDEX, epoch=epoch)
    with torch.no_grad():
        hard_ce = F.cross_entropy(model(x_adv), Y).item()
    assert ("bank_index" in out) == refined and ("bank_targets" in out) == refined
    if refined:
        assert out["loss"].item() != pytest.approx(hard_ce, abs=1e-4)
        assert out["target_confidence"] < 1
    else:
        assert out["loss"].item() == pytest.approx(hard_ce, abs=1e-6)
        assert "target_confidence" not in out
    assert torch.equal(objective.bank, F.one_hot(LABELS, K).float())  # forward never writes the bank itself


# (method.start_epoch, schedule.epochs, resolved 1-based start epoch)
START_EPOCHS = [(0.45, 200, 90), (90, 200, 90), (0.6, 3, 2), (0, 10, 1), (0.5, 10, 5), (11, 10, 11)]


@pytest.mark.parametrize("start, epochs, expected", START_EPOCHS)
def test_recipe_start_epoch(start, epochs, expected):
    recipe = from_dict({"method": {"start_epoch": start}, "schedule": {"epochs": epochs, "name": "cosine"}})
    assert recipe.start_epoch == expected


def test_trades_loss(model, inputs):
    x, x_adv = inputs
    out = TRADES(beta=6.0)(model, x, x_adv, Y, INDEX, epoch=1)
    with torch.no_grad():
        adv, clean = model(x_adv), model(x)
    ce = (-(onehot(Y) * log_softmax(clean)).sum(1)).mean()
    p = softmax(clean)
    kl = (p * (p.log() - log_softmax(adv))).sum(1).mean()  # KL(clean || adv), batchmean
    assert out["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert out["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx((ce + 6.0 * kl).item(), abs=1e-5)
    torch.testing.assert_close(out["logits"], adv)
    assert trades_kl(clean, clean).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("epoch", [1, 2])
def test_sglr_trades_soft_target_in_clean_term(model, inputs, epoch):
    x, x_adv = inputs
    objective = sglr(start_epoch=2, trades=True, beta=3.0)
    t_old = soft_bank()
    objective.write_bank(torch.arange(len(LABELS)), t_old)
    assert objective.attack_loss == "kl"
    out = objective(model, x, x_adv, Y, INDEX, epoch=epoch)
    with torch.no_grad():
        adv, clean = model(x_adv), model(x)
    p = softmax(clean)
    kl = (p * (p.log() - log_softmax(adv))).sum(1).mean()
    if epoch < 2:  # plain TRADES before the start epoch
        target = onehot(Y)
        assert "bank_targets" not in out
    else:
        target = 0.9 * t_old[INDEX].double() + 0.1 * (0.8 * softmax(adv) + 0.2 * softmax(clean))
        torch.testing.assert_close(out["bank_targets"].double(), target, rtol=0, atol=1e-6)
    ce = (-(target * log_softmax(clean)).sum(1)).mean()
    assert out["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert out["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx((ce + 3.0 * kl).item(), abs=1e-5)


def test_weight_teacher(model, inputs):
    """teacher='weights': p comes from an EMA copy of the weights (timm's ModelEmaV3); no bank is written."""
    x, x_adv = inputs
    objective = sglr(model=model, teacher="weights", teacher_decay=0.9)
    assert isinstance(objective.teacher, ModelEmaV3)
    teacher = objective.teacher.module
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(teacher.parameters(), model.parameters()))

    out = objective(model, x, x_adv, Y, INDEX, epoch=1)
    assert "bank_index" not in out and "bank_targets" not in out
    assert model.training  # the teacher's eval mode does not leak into the student
    with torch.no_grad():
        target = 0.8 * softmax(teacher(x_adv)) + 0.2 * softmax(teacher(x))
        loss = (-(target * log_softmax(model(x_adv))).sum(1)).mean()
    assert out["loss"].item() == pytest.approx(loss.item(), abs=1e-6)

    old = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    objective.update_teacher(model)
    for ema, before, new in zip(teacher.parameters(), old, model.parameters()):
        torch.testing.assert_close(ema, 0.9 * before + 0.1 * new)
    assert "teacher.module.fc.weight" in objective.state_dict()  # checkpointed with the objective


def test_bank_is_checkpointed(model, inputs):
    x, x_adv = inputs
    objective = sglr()
    out = objective(model, x, x_adv, Y, INDEX, epoch=1)
    objective.write_bank(out["bank_index"], out["bank_targets"])
    state = objective.state_dict()
    assert set(state) == {"bank"} and torch.equal(state["bank"], objective.bank)
    restored = sglr()
    restored.load_state_dict(state)
    assert torch.equal(restored.bank, objective.bank)


def test_pgd_at(model, inputs):
    x, x_adv = inputs
    out = PGDAT()(model, x, x_adv, Y, INDEX, epoch=1)
    with torch.no_grad():
        ce = (-(onehot(Y) * log_softmax(model(x_adv))).sum(1)).mean()
    assert out["loss"].item() == pytest.approx(ce.item(), abs=1e-6)


def test_soft_cross_entropy_with_onehot_is_ce():
    logits = torch.randn(5, K, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 0])
    soft = soft_cross_entropy(logits, F.one_hot(y, K).float())
    assert soft.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)
    uniform = soft_cross_entropy(torch.zeros(2, K), torch.full((2, K), 1 / K))
    assert uniform.item() == pytest.approx(math.log(K), abs=1e-6)


# (method.name, class, attack loss)
OBJECTIVES = [("pgd_at", PGDAT, "ce"), ("trades", TRADES, "kl"), ("sglr", SGLR, "ce"), ("sglr_trades", SGLR, "kl")]


@pytest.mark.parametrize("name, cls, attack_loss", OBJECTIVES)
def test_build_objective(model, name, cls, attack_loss):
    objective = build_objective(MethodConfig(name=name), labels=LABELS, num_classes=K, start_epoch=3, model=model)
    assert type(objective) is cls and objective.attack_loss == attack_loss
    if cls is SGLR:
        assert objective.start_epoch == 3 and objective.trades == (name == "sglr_trades")
        assert objective.bank.shape == (len(LABELS), K) and objective.teacher is None
