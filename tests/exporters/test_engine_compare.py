"""Polygraphy comparison of two runtimes: the build stage's TensorRT-vs-ONNX Runtime check, run here on two
ONNX Runtime graphs of the same student (the TensorRT and CPU flavours), and on a deliberately broken one."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from calib.config import QuantConfig
from exporters.engine_compare import compare_runners, onnxruntime_runner, random_feeds
from tests.models import student_and_graphs

pytest.importorskip("polygraphy")


@pytest.fixture(scope="module")
def flavours(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flavours")
    _, _, _, graphs = student_and_graphs("bert", QuantConfig(), folder)
    paths = {}
    for flavour, graph in graphs.items():
        paths[flavour] = folder / f"{flavour}.onnx"
        onnx.save(graph, str(paths[flavour]))
    return folder, paths


def test_the_two_flavours_of_one_student_agree(flavours):
    _, paths = flavours
    feeds = random_feeds([(1, 16), (4, 24)], vocab_size=512)
    cpu_kernels = onnxruntime_runner(paths["cpu"], "cpu", reference_qdq=False)
    result = compare_runners(onnxruntime_runner(paths["trt"], "trt"), cpu_kernels, feeds)
    assert result.passed, result.describe()
    assert result.feeds == 2 and result.min_cosine > 0.9999 and "agree" in result.describe()


def test_a_wrong_weight_scale_is_caught(flavours):
    folder, paths = flavours
    broken = onnx.load(str(paths["trt"]))
    for scale in broken.graph.initializer:  # an exporter bug: the MLP's weight scales in the wrong unit
        if scale.name.endswith("dense.weight_scale"):
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 64, scale.name))
    onnx.save(broken, str(folder / "broken.onnx"))
    feeds = random_feeds([(2, 16)], vocab_size=512)
    result = compare_runners(
        onnxruntime_runner(paths["trt"], "trt"), onnxruntime_runner(folder / "broken.onnx", "x"), feeds
    )
    assert not result.passed and "DISAGREE" in result.describe()
    assert result.max_abs_diff > result.atol


@pytest.mark.parametrize("kv_cache", [False, True], ids=["float-cache", "int8-cache"])
def test_a_decoders_flavours_agree_on_the_prompt_and_a_cached_step(kv_cache, tmp_path):
    from exporters.cpu_kernels import ort_session
    from exporters.decoding import graph_cache_layout

    _, _, _, graphs = student_and_graphs("llama", QuantConfig(kv_cache=kv_cache), tmp_path)
    paths = {}
    for flavour, graph in graphs.items():
        paths[flavour] = tmp_path / f"{flavour}.onnx"
        onnx.save(graph, str(paths[flavour]))
    layout = graph_cache_layout(ort_session(paths["trt"]))
    feeds = random_feeds([(1, 16), (2, 8)], vocab_size=256, cache=layout)
    assert len(feeds) == 4 and feeds[1]["past_key_values.0.key"].shape == (1, layout.kv_heads, 15, layout.head_dim)
    cpu_kernels = onnxruntime_runner(paths["cpu"], "cpu", reference_qdq=False)
    result = compare_runners(onnxruntime_runner(paths["trt"], "trt"), cpu_kernels, feeds)
    assert result.passed and result.feeds == 4, result.describe()
