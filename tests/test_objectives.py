"""Training objectives against hand computations from shared/SGLR.md: the SGLR bank update and soft CE, TRADES."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from sglr_zoo.objectives import (
    PGDAT,
    SGLR,
    TRADES,
    Objective,
    bank_dtype,
    build_objective,
    soft_cross_entropy,
    trades_kl,
)
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


# ---- the objective's own state updates, and the bank's storage -------------------------------------------------

def identity_gather(tensor: torch.Tensor) -> torch.Tensor:
    """One process: gathering returns the tensor itself."""
    return tensor


class AuthorsSGLS:
    """The soft-label update and loss of the authors' code (devicerxx/SGLS, losses/loss.py, class SGLS), verbatim
    apart from the device: an independent reference for SGLR's defaults (fp32 bank, r_hard 0, temperature 1)."""

    def __init__(self, labels: torch.Tensor, num_classes: int, momentum: float = 0.9):
        self.soft_labels = torch.zeros(labels.shape[0], num_classes, dtype=torch.float)
        self.soft_labels[torch.arange(labels.shape[0]), labels] = 1
        self.momentum = momentum

    def __call__(self, model: nn.Module, x_natural: torch.Tensor, x_adv: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
        logits = model(x_adv)
        prob = F.softmax(logits.detach(), dim=1)
        clean_out = model(x_natural)
        clean_prob = F.softmax(clean_out.detach(), dim=1)
        self.soft_labels[index] = self.momentum * self.soft_labels[index] + \
            (1 - self.momentum) * (0.2 * clean_prob + 0.8 * prob)
        loss = torch.sum(-F.log_softmax(logits, dim=1) * self.soft_labels[index], dim=1)
        return loss.mean()


def run_bank_updates(bank_dtype: str, epochs: int = 30) -> tuple[SGLR, AuthorsSGLS, list[tuple[float, float]]]:
    """Both implementations through `epochs` epochs of 2 batches over the 5 examples, the model changing between
    steps; returns them and each step's (our loss, their loss)."""
    generator = torch.Generator().manual_seed(4)
    model = LinearModel().train()
    objective, authors = sglr(bank_dtype=bank_dtype), AuthorsSGLS(LABELS, K)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(LABELS), generator=generator)
        for index in order.split(3):
            x = torch.rand(len(index), 1, 2, 3, generator=generator)
            x_adv = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
            out = objective(model, x, x_adv, LABELS[index], index, epoch=1)
            objective.after_step(out, model, identity_gather)
            losses.append((out["loss"].item(), authors(model, x, x_adv, index).item()))
            with torch.no_grad():  # a "training step": the predictions move
                model.fc.weight.add_(0.2 * torch.randn(model.fc.weight.shape, generator=generator))
    return objective, authors, losses


@pytest.mark.slow
def test_float32_bank_is_bit_exact_with_the_authors_code():
    objective, authors, losses = run_bank_updates("float32")
    assert objective.bank.dtype == torch.float32
    assert torch.equal(objective.bank, authors.soft_labels)
    assert all(ours == theirs for ours, theirs in losses)
    assert (objective.bank.max(1).values < 0.99).all()  # the labels were refined, far from one-hot


@pytest.mark.slow
def test_float16_bank_stays_close_to_the_authors_code():
    objective, authors, losses = run_bank_updates("float16")
    assert objective.bank.dtype == torch.float16
    torch.testing.assert_close(objective.bank.float(), authors.soft_labels, rtol=0, atol=1e-3)
    assert all(ours == pytest.approx(theirs, rel=1e-3) for ours, theirs in losses)
    assert not torch.equal(objective.bank.float(), authors.soft_labels)  # it is float16 arithmetic after all


# (examples, classes, bank_dtype, storage): auto keeps float32 below 256 MiB
BANK_DTYPES = [
    (50_000, 10, "auto", torch.float32),  # CIFAR-10: 2 MB
    (50_000, 100, "auto", torch.float32),
    (1_281_167, 1000, "auto", torch.float16),  # ImageNet-1k: 5.1 GB in float32, 2.6 GB in float16
    (2**26 - 1, 1, "auto", torch.float32),  # just under 256 MiB
    (2**26, 1, "auto", torch.float16),  # exactly 256 MiB
    (1_281_167, 1000, "float32", torch.float32),
    (50_000, 10, "float16", torch.float16),
]


@pytest.mark.parametrize("examples, classes, name, dtype", BANK_DTYPES)
def test_bank_dtype(examples, classes, name, dtype):
    assert bank_dtype(name, examples, classes) is dtype


def test_bank_dtype_from_the_recipe(model, inputs):
    x, x_adv = inputs
    assert from_dict({}).method.bank_dtype == "auto"
    objective = sglr(bank_dtype="float16")
    assert objective.bank.dtype == torch.float16 and torch.equal(objective.bank.float(), F.one_hot(LABELS, K).float())
    out = objective(model, x, x_adv, Y, INDEX, epoch=1)
    assert out["bank_targets"].dtype == torch.float32  # the EMA is computed in fp32 and rounded when written
    objective.after_step(out, model, identity_gather)
    assert objective.bank.dtype == torch.float16
    assert torch.equal(objective.bank[INDEX], out["bank_targets"].half())


def test_after_step_writes_the_gathered_update(model, inputs):
    """With several processes every one writes every process's updates: what `gather` returns, not its own."""
    x, x_adv = inputs
    objective = sglr()
    out = objective(model, x, x_adv, Y, INDEX, epoch=1)
    other_index, other_targets = torch.tensor([1, 2]), torch.full((2, K), 1 / K)  # another process's share

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, other_index if tensor.dtype == torch.int64 else other_targets])

    objective.after_step(out, model, gather)
    assert torch.equal(objective.bank[INDEX], out["bank_targets"])
    assert torch.equal(objective.bank[other_index], other_targets)
    assert objective.local_modules() == []


def test_after_step_before_the_start_epoch_keeps_the_bank(model, inputs):
    x, x_adv = inputs
    objective = sglr(start_epoch=3)
    objective.after_step(objective(model, x, x_adv, Y, INDEX, epoch=2), model, identity_gather)
    assert torch.equal(objective.bank, F.one_hot(LABELS, K).float())


def test_after_step_updates_the_weight_teacher(model, inputs):
    x, x_adv = inputs
    objective = sglr(model=model, teacher="weights", teacher_decay=0.5)
    assert objective.local_modules() == [objective.teacher.module]
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    objective.after_step(objective(model, x, x_adv, Y, INDEX, epoch=1), model, identity_gather)
    torch.testing.assert_close(objective.teacher.module.fc.weight, model.fc.weight - 0.5)


@pytest.mark.parametrize("objective", [PGDAT(), TRADES(beta=6.0)], ids=["pgd_at", "trades"])
def test_baselines_keep_no_state(model, inputs, objective):
    x, x_adv = inputs
    out = objective(model, x, x_adv, Y, INDEX, epoch=1)
    objective.after_step(out, model, identity_gather)
    assert isinstance(objective, Objective) and objective.state_dict() == {} and objective.local_modules() == []


@pytest.mark.parametrize("name", ["pgd_at", "trades"])
def test_label_smoothing_smooths_hard_labels(name):
    """label_smoothing s: the CE target puts 1 - s + s/K on the label and s/K elsewhere (torch's definition)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x, y = torch.rand(5, 6), torch.tensor([0, 1, 2, 3, 0])
    plain = build_objective(MethodConfig(name=name), labels=y, num_classes=4, start_epoch=1, model=model)
    smooth = build_objective(MethodConfig(name=name, label_smoothing=0.4), labels=y, num_classes=4, start_epoch=1,
                             model=model)
    logits = model(x)  # x_adv = x here: the CE of both is on these logits, and TRADES' KL is 0
    targets = F.one_hot(y, 4).float() * 0.6 + 0.1
    expected = -(targets * logits.log_softmax(1)).sum(1).mean()
    got = smooth(model, x, x, y, torch.arange(5), 1)
    ce = got["loss"] if name == "pgd_at" else got["loss"] - smooth.beta * trades_kl(logits, logits)
    torch.testing.assert_close(ce, expected)
    assert not torch.allclose(plain(model, x, x, y, torch.arange(5), 1)["loss"], got["loss"])


def test_sglr_smooths_the_one_hot_share_not_the_refined_labels():
    """With r_hard 0.5 and label smoothing 0.4, SGLR's target is 0.5 * smoothed one-hot + 0.5 * refined."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x, y = torch.rand(5, 6), torch.tensor([0, 1, 2, 3, 0])
    cfg = MethodConfig(name="sglr", r_hard=0.5, label_smoothing=0.4, alpha=0.9, adv_weight=1.0)
    sglr = build_objective(cfg, labels=y, num_classes=4, start_epoch=1, model=model)
    out = sglr(model, x, x, y, torch.arange(5), 1)
    onehot = F.one_hot(y, 4).float()
    refined = 0.9 * onehot + 0.1 * model(x).detach().softmax(1)  # the bank starts one-hot, unsmoothed
    targets = 0.5 * (onehot * 0.6 + 0.1) + 0.5 * refined
    torch.testing.assert_close(out["ce"], -(targets * model(x).log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(out["bank_targets"], refined)
