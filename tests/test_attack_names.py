"""The one grammar of attack names."""

import pytest

from sglr_zoo.attack_names import AttackName


@pytest.mark.parametrize("name, kind, steps, label, passes", [
    ("clean", "clean", 0, "clean", 1), ("pgd20", "pgd", 20, "PGD-20", 21), ("cw5", "cw", 5, "CW-5", 6),
    ("autoattack", "autoattack", 0, "AutoAttack", None)])
def test_names_parse_to_their_spec_and_back(name, kind, steps, label, passes):
    spec = AttackName.parse(name)
    assert (spec.kind, spec.steps, spec.label, spec.passes) == (kind, steps, label, passes)
    assert str(spec) == name and AttackName.is_valid(name)


@pytest.mark.parametrize("name", ["pgd", "pgd0", "pgd07", "PGD20", "fgsm", "cw-20", "pgd20 ", "", "autoattack2"])
def test_other_names_are_refused_naming_the_choices(name):
    assert not AttackName.is_valid(name)
    with pytest.raises(ValueError, match=r"unknown attack .*choose from clean, pgd<steps>"):
        AttackName.parse(name)
