"""Epsilon warm-up: the ramp's factor, the eps of each training step, and what the card says."""

from __future__ import annotations

import pytest

import sglr_zoo.loop as loop
from sglr_zoo.cards import render_card
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import from_dict
from sglr_zoo.schedule import warmup_factor
from sglr_zoo.source import collect
from tests.test_training import TINY, make_recipe, run_train

pytestmark = pytest.mark.usefixtures("fresh_accelerate", "one_thread")


@pytest.mark.parametrize("fraction, start, shape, factor", [
    (0.0, 0.0, "linear", 0.0), (0.25, 0.0, "linear", 0.5), (0.25, 0.2, "linear", 0.6), (0.5, 0.0, "linear", 1.0),
    (0.9, 0.0, "linear", 1.0), (0.25, 0.0, "cosine", 0.5), (0.125, 0.0, "cosine", 0.1464466),
])
def test_the_ramp_over_the_first_half(fraction, start, shape, factor):
    assert warmup_factor(fraction, 0.5, start, shape) == pytest.approx(factor)


def test_a_run_ramps_its_training_attack_and_says_so(tmp_path, tiny_dataset, monkeypatch):
    """8 steps (4 an epoch), `attack.warmup: 0.5`: steps 1-4 attack at 0, 1/4, 1/2 and 3/4 of eps = 8/255 (the step
    size with it), steps 5-8 at eps; the monitoring attacks at the full eps; the card states the ramp."""
    calls = []
    pgd = loop.pgd

    def recorded(model, x, y, **options):
        calls.append((options["eps"], options["step_size"]))
        return pgd(model, x, y, **options)

    monkeypatch.setattr(loop, "pgd", recorded)
    run = run_train(make_recipe(TINY, tiny_dataset, tmp_path, "attack.warmup=0.5", "attack.step_size=2/255"))
    factors = [0, 0.25, 0.5, 0.75, 1, 1, 1, 1]
    assert calls == [pytest.approx((8 / 255 * f, 2 / 255 * f)) for f in factors]
    card = str(render_card(collect(run)))
    assert "eps warm-up: from 0 x eps to eps = 8/255 over the first 50% of the run (linear)" in card
    assert "monitoring and evaluation at the full eps" in card


def test_warmup_settings_are_checked():
    with pytest.raises(UserError, match="attack.warmup: must be in"):
        from_dict({}, ["attack.warmup=1.5"])
    with pytest.raises(UserError, match="attack.warmup_from: must be in"):
        from_dict({}, ["attack.warmup_from=1"])
