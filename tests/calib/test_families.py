"""Every registered FamilySpec describes its architecture: the names it holds exist in a tiny model of it."""

from __future__ import annotations

import pytest

from calib.config import ModelSource, RandomModel, TaskConfig
from calib.families import FAMILIES, block_of, family_of, layer_widths
from calib.models import load_backbone
from calib.placement import quantizable_layers


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_spec_names_what_a_tiny_model_of_the_family_has(name):
    spec = FAMILIES[name]
    kind = "causal-lm" if "causal-lm" in spec.task_kinds else spec.task_kinds[0]
    random = RandomModel(family=name, kv_heads=2 if "kv_heads" in spec.sizes.values() else None)
    backbone = load_backbone(ModelSource(random=random), TaskConfig(kind=kind))
    assert family_of(backbone) is spec
    layers = quantizable_layers(backbone)
    blocks = sorted({block_of(layer) for layer in layers})
    assert len(blocks) == random.layers and all(b.endswith(f"{spec.block}.{i}") for i, b in enumerate(blocks))
    modules = dict(backbone.named_modules())
    for block in blocks:
        assert f"{block}.{spec.attention}" in modules
        for rule in spec.fold_rules:
            assert all(f"{block}.{leaf}" in layers for leaf in rule.consumers), rule
            assert rule.source is None or f"{block}.{rule.source}" in modules, rule
    assert layer_widths(backbone.config) == {random.hidden, random.intermediate}


def test_an_unregistered_architecture_is_named_with_the_registered_ones():
    with pytest.raises(ValueError, match="model type 't5' has no FamilySpec"):
        family_of(type("Config", (), {"model_type": "t5"})())
