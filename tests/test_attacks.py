"""PGD in pixel space: the eps-ball and [0, 1], loss ascent, no parameter gradients, mode restored, torchattacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglr_zoo.attacks import L2Threat, LinfThreat, model_mode, pgd
from sglr_zoo.models import create_model

# (threat, eps, step_size): the L-inf setting of the paper and a common L2 one.
THREATS = [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.125)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny PreAct ResNet (with BatchNorm) after a few SGD steps on random data: sensitive enough to its input."""
    torch.manual_seed(0)
    net = create_model("preactresnet_tiny_cifar", 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(20):
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return net.eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, threat: str, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if threat == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps + 1e-5).all(), delta.norm(dim=1)


@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("threat, eps, step_size", THREATS)
def test_stays_in_ball_and_raises_loss(model, batch, threat, eps, step_size, random_start):
    x, y = batch
    x_adv = pgd(model, x, y, threat=threat, eps=eps, step_size=step_size, steps=5, random_start=random_start)
    assert_in_ball(x_adv, x, threat, eps)
    assert not x_adv.requires_grad
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    assert adv > clean + 0.02, (clean, adv)


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
@pytest.mark.parametrize("threat, eps, step_size", THREATS)
def test_losses_run(model, batch, threat, eps, step_size, loss):
    x, y = batch
    x_adv = pgd(model, x, y, threat=threat, eps=eps, step_size=step_size, steps=2, loss=loss)
    assert_in_ball(x_adv, x, threat, eps)
    assert torch.isfinite(x_adv).all() and not torch.equal(x_adv, x)


@pytest.mark.parametrize("threat", ["linf", "l2"])
def test_eps_zero_returns_x(model, batch, threat):
    x, y = batch
    x_adv = pgd(model, x, y, threat=threat, eps=0.0, steps=3)
    assert torch.equal(x_adv, x) and x_adv.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("threat, eps, step_size", THREATS)
def test_no_parameter_gradients(model, batch, threat, eps, step_size):
    """The attack differentiates w.r.t. the input only: no .grad is created, existing ones are left as they are."""
    x, y = batch
    assert all(p.grad is None for p in model.parameters())
    pgd(model, x, y, threat=threat, eps=eps, step_size=step_size, steps=2)
    assert all(p.grad is None for p in model.parameters())

    grads = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    try:
        pgd(model, x, y, threat=threat, eps=eps, step_size=step_size, steps=2)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    finally:
        model.zero_grad(set_to_none=True)


def _modes(net: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in net.named_modules()}


# (mode the model is in, a submodule put in the other mode, attack mode)
MODES = [(True, False, "eval"), (False, True, "eval"), (True, False, "train"), (False, True, "train")]


@pytest.mark.parametrize("model_training, odd_training, attack_mode", MODES)
def test_mode_restored(batch, model_training, odd_training, attack_mode):
    torch.manual_seed(0)
    net = create_model("preactresnet_tiny_cifar", 10).train(model_training)
    odd = net.get_classifier()
    odd.train(odd_training)
    before = _modes(net)
    assert len(set(before.values())) == 2  # the submodule really is in the other mode

    seen = []
    hook = net.register_forward_pre_hook(lambda module, args: seen.append(set(_modes(module).values())))
    x, y = batch
    pgd(net, x, y, steps=2, mode=attack_mode)
    hook.remove()
    assert seen and all(modes == {attack_mode == "train"} for modes in seen)  # every submodule during the attack
    assert _modes(net) == before


def test_model_mode_restores_after_error():
    net = create_model("preactresnet_tiny_cifar", 10).train()
    net.get_classifier().eval()
    before = _modes(net)
    with pytest.raises(RuntimeError), model_mode(net, "eval"):
        assert not any(_modes(net).values())
        raise RuntimeError("inside")
    assert _modes(net) == before


@pytest.mark.parametrize("threat, eps, step_size", THREATS)
def test_autocast_bf16(model, batch, threat, eps, step_size):
    """Under bf16 autocast (how training attacks on a CPU with native bf16) the attack returns fp32 images in the
    ball and raises the fp32 loss about as much as the fp32 attack from the same random start."""
    x, y = batch

    def attacked(precision: torch.dtype) -> tuple[torch.Tensor, float]:
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            x_adv = pgd(model, x, y, threat=threat, eps=eps, step_size=step_size, steps=3)
        with torch.no_grad():
            return x_adv, F.cross_entropy(model(x_adv), y).item()

    (x_adv, bf16_loss), (_, fp32_loss) = attacked(torch.bfloat16), attacked(torch.float32)
    assert_in_ball(x_adv, x, threat, eps)
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y).item()
    assert bf16_loss - clean_loss >= 0.8 * (fp32_loss - clean_loss) > 0, (clean_loss, bf16_loss, fp32_loss)


@pytest.mark.parametrize("steps", [1, 5])
def test_matches_torchattacks(model, batch, steps):
    """Same steps/alpha/eps, no random start, eval mode: torchattacks' mean CE has the same gradient sign.

    A batch of 8 makes torchattacks' 1/N an exact power of two, so every gradient sign agrees exactly.
    """
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    reference = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=False)(x, y)
    ours = pgd(model, x, y, threat="linf", eps=8 / 255, step_size=2 / 255, steps=steps, random_start=False)
    assert (ours - reference).abs().max() <= 1e-6
    assert not model.training


@pytest.mark.parametrize("threat_class", [LinfThreat, L2Threat])
def test_projection_and_random_start(threat_class):
    torch.manual_seed(0)
    eps = 0.1
    ball = threat_class(eps)
    x = torch.rand(4, 3, 8, 8)
    start = ball.random_start(x)
    far = x + 10 * torch.randn_like(x)
    projected = ball.project(far, x)
    delta = (projected - x).flatten(1)
    if threat_class is LinfThreat:
        assert (start - x).abs().max() <= eps and delta.abs().max() <= eps + 1e-7
    else:
        assert torch.allclose((start - x).flatten(1).norm(dim=1), torch.full((4,), eps))
        assert torch.allclose(delta.norm(dim=1), torch.full((4,), eps))
    inside = x + 0.1 * eps * (start - x) / eps
    assert torch.allclose(ball.project(inside, x), inside)  # points in the ball do not move


def test_nfgsm_noise_and_no_projection(model, batch):
    """N-FGSM: a random start in the ball of 2 eps, one step of eps, nothing projected back into the eps-ball;
    the standard attack stays inside it."""
    x, y = batch
    eps = 8 / 255
    torch.manual_seed(0)
    nfgsm = pgd(model, x, y, eps=eps, step_size=eps, steps=1, noise=2.0, project=False)
    delta = (nfgsm - x).abs()
    assert nfgsm.min() >= 0 and nfgsm.max() <= 1
    assert eps < delta.max() <= 3 * eps + 1e-6  # up to 2 eps of noise and a step of eps
    torch.manual_seed(0)
    noise_only = pgd(model, x, y, eps=eps, step_size=1e-9, steps=1, noise=2.0, project=False)
    assert (noise_only - x).abs().max() > 1.5 * eps  # the start itself reaches beyond the eps-ball
    torch.manual_seed(0)
    assert_in_ball(pgd(model, x, y, eps=eps, step_size=eps, steps=1, noise=2.0), x, "linf", eps)
