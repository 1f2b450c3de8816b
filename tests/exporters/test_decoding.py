"""Causal LMs exported with a KV cache: cache shapes, the cached path against the full-sequence call, left-padded
batches, greedy and sampled decoding against the PyTorch model, and the decoder checks of validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calib.config import QuantConfig, WeightQuant
from calib.inputs import random_tokens
from calib.student import kv_cache_quantizers
from exporters.config import DecoderCheckConfig
from exporters.cpu_kernels import ort_session
from exporters.decoder_checks import cache_consistency, decoder_report, greedy_agreement, prompt_ids
from exporters.decoding import (
    OrtStepper,
    Sampling,
    cached_logits,
    generate,
    graph_cache_layout,
    greedy_tokens,
    left_pad,
    position_ids,
    run_full_sequence,
)
from exporters.onnx_export import export_onnx, teacher_export_model
from exporters.runners import TorchStepper
from tests.exporters.test_onnx_qdq import min_row_cosine
from tests.models import student_and_graphs, tiny_teacher

DECODERS = ["gpt2", "llama", "qwen2"]  # qwen2: grouped-query attention (2 key/value heads for 4 query heads)


@pytest.fixture(scope="module", params=DECODERS)
def exported(request, tmp_path_factory):
    """A tiny random causal LM and its FP32 graph with a KV cache."""
    teacher = tiny_teacher(request.param)
    path = tmp_path_factory.mktemp(request.param) / "fp32.onnx"
    export_onnx(teacher_export_model(teacher), path, 17)
    return teacher, OrtStepper(path, threads=1)


def _ids(teacher, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, teacher.backbone.config.vocab_size, size=(batch, seq), dtype=np.int64)


def test_cache_shapes_at_past_zero_and_beyond(exported):
    teacher, graph = exported
    layout = graph.layout
    config = teacher.backbone.config
    assert layout.layers == config.num_hidden_layers
    ids = _ids(teacher, 3, 5)
    mask = np.ones_like(ids)
    logits, present = graph(ids, mask, position_ids(mask), graph.empty_past(3))
    assert logits.shape == (3, 5, config.vocab_size)
    assert len(present) == 2 * layout.layers
    assert all(p.shape == (3, layout.kv_heads, 5, layout.head_dim) for p in present)
    step_mask = np.ones((3, 7), dtype=np.int64)
    logits, present = graph(ids[:, :2], step_mask, np.array([[5, 6]] * 3), present)  # two new tokens on a past of 5
    assert logits.shape == (3, 2, config.vocab_size)
    assert all(p.shape == (3, layout.kv_heads, 7, layout.head_dim) for p in present)


def test_cached_path_reproduces_the_full_sequence_call(exported):
    teacher, graph = exported
    ids = _ids(teacher, 2, 24, seed=1)
    full = run_full_sequence(graph.session, ids, np.ones_like(ids))
    np.testing.assert_allclose(cached_logits(graph, ids, prefill=10), full, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        expected = teacher(torch.from_numpy(ids), torch.ones(2, 24, dtype=torch.long)).numpy()
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-4)
    check = cache_consistency(graph, ids)
    assert check.prefill == 12 and check.relative_difference < 1e-4


def test_left_padded_batch_generates_what_each_prompt_does_alone(exported):
    teacher, graph = exported
    prompts = [_ids(teacher, 1, n, seed=n)[0].tolist() for n in (3, 7, 5)]
    ids, mask = left_pad(prompts, pad_id=0)
    assert mask.tolist()[0] == [0, 0, 0, 0, 1, 1, 1] and ids[0, :4].tolist() == [0, 0, 0, 0]
    assert position_ids(mask)[0].tolist() == [1, 1, 1, 1, 0, 1, 2]
    batched = np.stack(list(generate(graph, prompts, 6)), axis=1)
    alone = [greedy_tokens(graph, prompt, 6) for prompt in prompts]
    assert batched.tolist() == alone
    torch_batched = np.stack(list(generate(TorchStepper(teacher), prompts, 6)), axis=1)
    assert torch_batched.tolist() == alone  # the exported graph decodes what the PyTorch model decodes


def test_sampling_is_seeded_and_top_k_one_is_greedy(exported):
    teacher, graph = exported
    prompt = _ids(teacher, 1, 4)[0].tolist()
    sampled = [np.concatenate(list(generate(graph, [prompt], 8, sampling=Sampling(1.0, 0, seed=3)))) for _ in "ab"]
    assert sampled[0].tolist() == sampled[1].tolist()
    top1 = np.concatenate(list(generate(graph, [prompt], 8, sampling=Sampling(0.7, 1, seed=5))))
    assert top1.tolist() == greedy_tokens(graph, prompt, 8)


def test_generation_stops_at_the_end_token(exported):
    teacher, graph = exported
    prompt = _ids(teacher, 1, 4)[0].tolist()
    first = greedy_tokens(graph, prompt, 1)[0]
    assert [int(t[0]) for t in generate(graph, [prompt], 10, eos_id=first)] == [first]


def test_full_sequence_call_of_a_graph_without_cache_is_unchanged(tmp_path):
    teacher = tiny_teacher("bert")
    path = tmp_path / "bert.onnx"
    export_onnx(teacher_export_model(teacher), path, 17)
    session = ort_session(path)
    assert graph_cache_layout(session) is None
    ids = _ids(teacher, 2, 6)
    with torch.no_grad():
        expected = teacher(torch.from_numpy(ids), torch.ones(2, 6, dtype=torch.long)).numpy()
    np.testing.assert_allclose(run_full_sequence(session, ids, np.ones_like(ids)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize(
    "quant", [QuantConfig(), QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=32))]
)
def test_quantized_graphs_keep_their_cache_consistent_and_follow_the_student(family, quant, tmp_path):
    _, student, _, graphs = student_and_graphs(family, quant, tmp_path)
    ids = random_tokens(2, 16, student.backbone.config.vocab_size, seed=3).input_ids.numpy()
    prompts = prompt_ids(None, student.backbone.config.vocab_size, 4, seed=0)
    want = [greedy_tokens(TorchStepper(student), p, 8) for p in prompts]
    for flavour, graph in graphs.items():
        stepper = OrtStepper(ort_session(graph.SerializeToString(), reference_qdq=flavour == "trt"))
        assert cache_consistency(stepper, ids).relative_difference < 1e-3, flavour
        agreement = greedy_agreement([greedy_tokens(stepper, p, 8) for p in prompts], want)
        # int8 rounding may flip a near-tie of a random model's logits: most prompts, not all, must match
        assert agreement.exact >= 3, (flavour, agreement)


def test_greedy_agreement_names_where_continuations_part():
    agreement = greedy_agreement([[1, 2, 3], [1, 5, 3], [9, 9, 9]], [[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    assert (agreement.exact, agreement.first_divergence, agreement.new_tokens) == (1, [None, 1, 0], 3)
    assert agreement.exact_share == pytest.approx(1 / 3)


def test_decoder_report_compares_each_graph_with_its_reference(exported):
    teacher, graph = exported
    settings = DecoderCheckConfig(prompts=3, new_tokens=5, cache_windows=1, past=16, batches=(1, 2), repeats=2)
    prompts = prompt_ids(None, teacher.backbone.config.vocab_size, settings.prompts, seed=1)
    report = decoder_report(
        {"fp32-onnx": lambda: graph}, {"fp32-pytorch": TorchStepper(teacher)}, {"fp32-onnx": "fp32-pytorch"},
        prompts, _ids(teacher, 1, 16), settings,
    )  # fmt: skip
    row = report["models"]["fp32-onnx"]
    assert row["greedy"]["exact"] == 3 and row["greedy"]["first_divergence"] == [None] * 3
    assert row["cache"]["relative_difference"] < 1e-4
    assert [lat["batch"] for lat in row["latency"]] == [1, 2]
    assert all(lat["decode_ms"] > 0 and lat["prefill_ms"] > 0 for lat in row["latency"])


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize(
    "quant",
    [QuantConfig(kv_cache=True), QuantConfig(kv_cache=True, attention_matmuls=True)],
    ids=["W8A8kv8", "W8A8attention-kv8"],
)
def test_an_int8_cache_is_int8_in_the_graph_and_the_students_function(family, quant, tmp_path):
    teacher, student, contract, graphs = student_and_graphs(family, quant, tmp_path)
    layout = OrtStepper(ort_session(graphs["cpu"].SerializeToString())).layout
    assert layout.dtype == "int8" and len(contract.kv_cache) == layout.layers
    scale = contract.tensors[f"{contract.kv_cache[0]}.key_cache_scale"]
    assert scale.shape == (layout.kv_heads,) and len(set(scale.tolist())) == layout.kv_heads  # one per head
    ids = random_tokens(2, 16, teacher.backbone.config.vocab_size, seed=3).input_ids.numpy()
    run = (torch.from_numpy(ids), torch.ones(2, 16, dtype=torch.long))
    with torch.no_grad():
        expected = student(*run).numpy()
        for group in kv_cache_quantizers(student).values():
            group.key.enabled = group.value.enabled = False
        float_cache = student(*run).numpy()
    assert not np.allclose(expected, float_cache, atol=1e-5)  # the cache quantizers do something
    for flavour, graph in graphs.items():
        stepper = OrtStepper(ort_session(graph.SerializeToString(), reference_qdq=flavour == "trt"))
        _, present = stepper(ids[:, :4], np.ones((2, 4), np.int64), position_ids(np.ones((2, 4), np.int64)),
                             stepper.empty_past(2))  # fmt: skip
        assert all(p.dtype == np.int8 for p in present)
        got = cached_logits(stepper, ids, prefill=6)
        cosine = min_row_cosine(got, expected)
        assert cosine > 0.9999, (flavour, cosine)
        assert cache_consistency(stepper, ids).relative_difference < 1e-4, flavour


def test_tensorrt_profiles_cover_the_prompt_and_every_cached_step(exported):
    from exporters.tensorrt_build import ShapeRange, input_profile

    _, graph = exported
    shapes = ShapeRange(min=(1, 1), opt=(4, 256), max=(4, 256))
    for tensor in graph.session.get_inputs():
        dims = tuple(d if isinstance(d, int) else -1 for d in tensor.shape)  # TensorRT's -1 for a dynamic axis
        low, opt, high = input_profile(dims, shapes)
        if tensor.name.startswith("past_key_values."):
            heads, width = graph.layout.kv_heads, graph.layout.head_dim
            assert (low, opt, high) == ((1, heads, 0, width), (4, heads, 256, width), (4, heads, 256, width))
        else:
            assert (low, opt, high) == ((1, 1), (4, 256), (4, 256)), tensor.name
