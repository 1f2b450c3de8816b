"""Rotations folded into decoders: exact in float (tied heads, grouped-query attention, LayerNorm shifts), kept
through the contract and both graph flavours, and what they are for: smaller static int8 activation error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from calib.block_calls import capture_block_call
from calib.config import QuadapterConfig, QuantConfig, RotationConfig, WeightQuant
from calib.contract import build_contract, load_student
from calib.errors import ConfigError
from calib.hadamard import OnlineHadamard, factor_orders, hadamard_factors, kronecker
from calib.inputs import random_tokens
from calib.rotation import rotate
from calib.student import build_student, init_ranges
from exporters.trt_check import check_trt_compatible
from tests.exporters.test_onnx_qdq import MAX_REL_DIFF, MIN_COSINE, _run, min_row_cosine
from tests.models import student_and_graphs, tiny_teacher

ROTATED = RotationConfig(enabled=True)
# Float folding changes the order of sums only: outputs agree to float32 rounding of the logits' size
FLOAT_TOLERANCE = 2e-5


@pytest.mark.parametrize("order", [2, 12, 20, 48, 64, 576, 1536])
def test_hadamard_factors_are_orthogonal_and_their_product_too(order):
    dense = kronecker(hadamard_factors(order))
    np.testing.assert_allclose(dense @ dense.T, np.eye(order), atol=1e-12)
    # a Hadamard matrix: every entry has the same magnitude (1 / sqrt(n)), so no channel keeps its weight
    np.testing.assert_allclose(dense.abs(), np.full((order, order), order**-0.5), rtol=1e-12)


def test_orders_without_a_hadamard_factorisation_are_named():
    assert factor_orders(576) == [12, 12, 4] and factor_orders(1536) == [12, 128]
    assert factor_orders(36) is None
    with pytest.raises(ValueError, match="order 36"):
        hadamard_factors(36)


def test_online_hadamard_multiplies_by_its_dense_matrix():
    module = OnlineHadamard(48)
    x = torch.randn(2, 5, 48)
    np.testing.assert_allclose(module(x), (x.double() @ module.matrix()).float(), atol=1e-5)


def _with_random_norms(model):
    """Norm scales (and LayerNorm shifts) away from their 1 / 0 init, so folding them is tested."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def _tied_llama():
    model = tiny_teacher("llama")
    backbone = model.backbone
    backbone.config.tie_word_embeddings = True
    backbone.lm_head.weight = backbone.model.embed_tokens.weight
    return model


TEACHERS = {
    "llama": lambda: tiny_teacher("llama"),
    "llama-tied": _tied_llama,
    "qwen2-grouped-kv": lambda: tiny_teacher("qwen2"),  # biases on Q/K/V, 2 key/value heads for 4
    "gpt2-tied": lambda: tiny_teacher("gpt2"),  # LayerNorm with shifts, fused QKV, Conv1D
    "llama-hidden-48": lambda: tiny_teacher("llama", hidden=48),  # Paley 12 x 4, head 12
}


@pytest.mark.parametrize("name", list(TEACHERS))
@pytest.mark.parametrize("online", [True, False])
def test_folded_rotations_compute_the_teachers_function(name, online):
    teacher = _with_random_norms(TEACHERS[name]())
    rotated = copy.deepcopy(teacher)
    layout = rotate(rotated, RotationConfig(enabled=True, online=online))
    batch = next(iter(random_tokens(4, 16, teacher.backbone.config.vocab_size, seed=0).batches(4)))
    _assert_same_function(teacher, rotated, batch, name)
    # a rotated stream makes the rotated table differ from the head: untied, the teacher's own left tied
    assert rotated.backbone.lm_head.weight is not rotated.backbone.get_input_embeddings().weight
    assert layout.untied_head and len(layout.online) == (2 if online else 0)
    if name.endswith("tied"):
        assert teacher.backbone.lm_head.weight is teacher.backbone.get_input_embeddings().weight


@torch.no_grad()
def _assert_same_function(teacher, rotated, batch, name) -> None:
    expected = batch.run(teacher, output_hidden_states=True)
    got = batch.run(rotated, output_hidden_states=True)
    np.testing.assert_allclose(got.output, expected.output, atol=FLOAT_TOLERANCE)
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):  # rotated back: the teacher's space
        np.testing.assert_allclose(mine, theirs, atol=FLOAT_TOLERANCE)
    embeds = teacher.backbone.get_input_embeddings()(batch.input_ids)
    from_embeds = rotated.run(batch.attention_mask, inputs_embeds=embeds).output
    if name.startswith("gpt2"):  # its position table adds after the word embeddings, rotated too
        from_embeds = rotated.run(batch.attention_mask, input_ids=batch.input_ids).output
    np.testing.assert_allclose(from_embeds, expected.output, atol=FLOAT_TOLERANCE)


def test_a_teachers_block_output_maps_onto_the_rotated_blocks_output():
    teacher = _with_random_norms(tiny_teacher("qwen2"))
    rotated = copy.deepcopy(teacher)
    rotate(rotated, ROTATED)
    batch = next(iter(random_tokens(4, 16, teacher.backbone.config.vocab_size, seed=0).batches(4)))
    block = "model.layers.0"
    theirs = capture_block_call(teacher, block, batch)
    mine = capture_block_call(rotated, block, batch)
    with torch.no_grad():
        target = theirs.run(teacher.backbone.get_submodule(block), theirs.hidden)
        got = mine.run(rotated.backbone.get_submodule(block), mine.hidden)
    np.testing.assert_allclose(got, rotated.to_residual_stream(target), atol=FLOAT_TOLERANCE)


def test_encoders_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"quant.rotation: needs a pre-norm causal LM .* not a bert"):
        build_student(tiny_teacher("bert"), QuantConfig(rotation=ROTATED))


ROTATED_SCHEMES = {
    "W8A8": QuantConfig(rotation=ROTATED),
    "W4A8g64-smoothed": QuantConfig(
        weights=WeightQuant(bits=4, granularity="per-group", group_size=64),  # TensorRT's int4 blocks: 64 or 128
        quadapter=QuadapterConfig(enabled=True, positions="all", init="smoothquant-search"),
        rotation=ROTATED,
    ),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("scheme", list(ROTATED_SCHEMES))
def test_rotated_students_export_in_both_flavours(family, scheme, tmp_path):
    quant = ROTATED_SCHEMES[scheme]
    teacher, student, contract, graphs = student_and_graphs(family, quant, tmp_path)
    assert contract.rotation["online"] and contract.rotation["untied_head"]
    tokens = random_tokens(8, 20, teacher.backbone.config.vocab_size, seed=7)
    with torch.no_grad():
        expected = student(tokens.input_ids, tokens.attention_mask).numpy()
        rebuilt = load_student(teacher, quant, contract)(tokens.input_ids, tokens.attention_mask).numpy()
    np.testing.assert_array_equal(rebuilt, expected)
    assert set(graphs) == {"trt", "cpu"}
    for flavour, graph in graphs.items():
        got = _run(graph, tokens.input_ids.numpy(), tokens.attention_mask.numpy(), reference_qdq=flavour == "trt")
        cosine = min_row_cosine(got, expected)
        assert cosine > MIN_COSINE, (flavour, cosine)
        # the online Hadamard: float MatMuls on constant factors, ahead of each down projection's quantizer
        rotations = [n for n in graph.graph.node if n.op_type == "MatMul" and "input_rotation" in n.name]
        width = teacher.backbone.config.intermediate_size if family != "gpt2" else teacher.backbone.config.n_inner
        assert len(rotations) == len(contract.rotation["online"]) * len(factor_orders(width))
    assert check_trt_compatible(graphs["trt"]) == []


def _kl_to_teacher(teacher, quant, batches) -> float:
    student = build_student(teacher, quant)
    init_ranges(student, quant, batches)
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            t = torch.log_softmax(batch.run(teacher).output, -1)
            s = torch.log_softmax(batch.run(student).output, -1)
            total += float((t.exp() * (t - s)).sum(-1).mean())
    return total / len(batches)


def test_rotations_shrink_static_int8_error_when_a_channel_is_an_outlier():
    teacher = tiny_teacher("llama")
    with torch.no_grad():  # one residual channel 30x the rest, as trained decoders have
        teacher.backbone.model.embed_tokens.weight[:, 5] *= 30
        for layer in teacher.backbone.model.layers:
            layer.input_layernorm.weight[5] = 20.0
            layer.post_attention_layernorm.weight[5] = 20.0
    batches = list(random_tokens(16, 24, teacher.backbone.config.vocab_size, seed=0).batches(8))
    plain = _kl_to_teacher(teacher, QuantConfig(), batches)
    rotated = _kl_to_teacher(teacher, QuantConfig(rotation=ROTATED), batches)
    assert rotated < plain / 2, (rotated, plain)


def _with_a_massive_down_input(teacher):
    """One MLP channel 50x the rest at the first token, as trained decoders' down projections see."""
    with torch.no_grad():
        for layer in teacher.backbone.model.layers:
            layer.mlp.up_proj.weight[7] *= 50
            layer.mlp.down_proj.weight[:, 7] /= 50
    return teacher


def test_searched_smoothing_folds_exactly_before_the_online_rotation():
    teacher = _with_a_massive_down_input(tiny_teacher("qwen2"))
    quant = QuantConfig(rotation=ROTATED, quadapter=QuadapterConfig(enabled=True, init="smoothquant-search"))
    student = build_student(teacher, quant)
    init_ranges(student, quant, random_tokens(16, 24, teacher.backbone.config.vocab_size, seed=0).batches(8))
    down = "model.layers.0.mlp.down_proj"
    assert student.smoothing[down] is not None  # the outlier channel is worth smoothing
    scale = student.backbone.get_submodule(down).quadapter.scale
    assert int(scale.argmax()) == 7
    contract = build_contract(student)  # folds the scale into up_proj's rows, ahead of the online Hadamard
    assert f"{down}.input_multiplier" not in contract.tensors and contract.smoothing == student.smoothing
    tokens = random_tokens(4, 16, teacher.backbone.config.vocab_size, seed=5)
    with torch.no_grad():
        expected = student(tokens.input_ids, tokens.attention_mask)
        for q in student.modules():
            if hasattr(q, "enabled"):
                q.enabled = False
        float_student = student(tokens.input_ids, tokens.attention_mask)
        rebuilt = load_student(teacher, quant, contract)(tokens.input_ids, tokens.attention_mask)
        teacher_out = teacher(tokens.input_ids, tokens.attention_mask)
    # folded, up_proj's rows carry 1 / a: the down projection's input differs by float rounding, which can move
    # an int8 activation across a rounding edge (the bound the exported graphs are held to)
    span = float(expected.max() - expected.min())
    np.testing.assert_allclose(rebuilt, expected, atol=MAX_REL_DIFF * span)
    np.testing.assert_allclose(float_student, teacher_out, atol=1e-4)  # smoothing + rotation: the same function


def test_searched_smoothing_beats_rotation_alone_on_a_massive_channel():
    teacher = _with_a_massive_down_input(tiny_teacher("llama"))
    batches = list(random_tokens(16, 24, teacher.backbone.config.vocab_size, seed=0).batches(8))
    rotated = _kl_to_teacher(teacher, QuantConfig(rotation=ROTATED), batches)
    smoothing = QuadapterConfig(enabled=True, init="smoothquant-search")
    smoothed = _kl_to_teacher(teacher, QuantConfig(rotation=ROTATED, quadapter=smoothing), batches)
    assert smoothed < rotated, (smoothed, rotated)
