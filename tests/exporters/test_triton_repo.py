"""The Triton model repository: layout, and every config.pbtxt parsed with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calib.config import ModelSource, RandomModel
from calib.errors import PipelineError
from exporters.config import DynamicBatchingConfig, ServeConfig
from exporters.triton_python_model import InvalidRequest, classify, decode_texts, encode
from exporters.triton_repo import Batching, RepositorySpec, write_repository
from exporters.triton_server import TritonServer, free_ports
from pipeline.config import PipelineConfig
from pipeline.runfolder import RunFolder
from pipeline.stages import STAGES
from pipeline.stages.base import StageContext
from pipeline.stages.package import PackageStage
from tests.models import LABELS, MAX_LENGTH, minilm_tokenizer

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the [serve] extra")
text_format = pytest.importorskip("google.protobuf.text_format")
InferenceServerClient = pytest.importorskip("tritonclient.http").InferenceServerClient

INPUT_NAMES = ("input_ids", "attention_mask")
ONNX_TYPES = {TensorProto.INT64: model_config_pb2.TYPE_INT64, TensorProto.FLOAT: model_config_pb2.TYPE_FP32}


def parse_configs(root: Path) -> dict[str, model_config_pb2.ModelConfig]:
    """Every model's config.pbtxt, parsed strictly; the folder name must be the model name."""
    configs = {}
    for path in sorted(root.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        assert (path.parent / "1").is_dir(), f"{path.parent.name} has no version folder"
        configs[config.name] = config
    return configs


def check_against_graph(config: model_config_pb2.ModelConfig, graph: Path) -> None:
    """Names, types and shapes (batch axis left out, -1 where dynamic) equal the ONNX graph's."""
    model = onnx.load(str(graph), load_external_data=False).graph
    for declared, values in ((config.input, model.input), (config.output, model.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            assert tensor.data_type == ONNX_TYPES[value.type.tensor_type.elem_type]
            assert list(tensor.dims) == dims[1:] and dims[0] == -1


def check_ensemble(ensemble: model_config_pb2.ModelConfig, configs: dict) -> None:
    """Each step reads only tensors that exist by then, under the composing model's own tensor names."""
    assert ensemble.platform == "ensemble"
    available = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert ensemble.max_batch_size <= model.max_batch_size
        inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        assert set(step.input_map) == set(inputs)
        for model_input, tensor in step.input_map.items():
            assert available[tensor][0] == inputs[model_input][0], f"{step.model_name}.{model_input} type"
        outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        for model_output, tensor in step.output_map.items():
            available[tensor] = outputs[model_output]
    for output in ensemble.output:
        assert available[output.name] == (output.data_type, list(output.dims))


def toy_graph(path: Path, kind: str) -> Path:
    """A graph with the pipeline's inputs and the task's output signature (its body does not matter here)."""
    shape = {"embedding": ["batch", 16], "classification": ["batch", 3], "causal-lm": ["batch", "sequence", 99]}
    name = "sentence_embedding" if kind == "embedding" else "logits"
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in INPUT_NAMES]
    node = helper.make_node("Cast", ["attention_mask"], [name], to=TensorProto.FLOAT)
    output = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape[kind])
    onnx.save(helper.make_model(helper.make_graph([node], "toy", inputs, [output])), str(path))
    return path


@pytest.mark.parametrize("kind", ["embedding", "classification", "causal-lm"])
def test_repository_configs_parse_and_match_the_graphs_for_every_task(kind, tmp_path):
    graph = toy_graph(tmp_path / "toy.onnx", kind)
    engine = tmp_path / "student.plan"
    engine.write_bytes(b"not a real engine: the config is what is checked")
    labels = ("a", "b", "c")
    spec = RepositorySpec(graph, (engine, graph), minilm_tokenizer(), kind, labels, 8, 128)
    summary = write_repository(tmp_path / "repo", spec)
    configs = parse_configs(tmp_path / "repo")
    text_models = {"student_text", "student_text_trt", "tokenizer"}
    expected = {"student_onnx", "student_trt", *text_models} | ({"postprocess"} if kind == "classification" else set())
    assert set(configs) == expected == set(summary["models"])
    onnx_model, plan = configs["student_onnx"], configs["student_trt"]
    assert onnx_model.platform == "onnxruntime_onnx" and plan.platform == "tensorrt_plan"
    assert onnx_model.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert plan.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for config in (onnx_model, plan):
        check_against_graph(config, graph)
        assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert (tmp_path / "repo" / "student_onnx" / "1" / "model.onnx").read_bytes() == graph.read_bytes()
    assert (tmp_path / "repo" / "student_trt" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    tokenizer = configs["tokenizer"]
    assert tokenizer.backend == "python" and tokenizer.parameters["max_length"].string_value == "128"
    assert (tmp_path / "repo" / "tokenizer" / "1" / "model.py").is_file()
    assert (tmp_path / "repo" / "tokenizer" / "1" / "tokenizer" / "tokenizer.json").is_file()
    for name in ("student_text", "student_text_trt"):
        check_ensemble(configs[name], configs)
    outputs = {t.name: list(t.dims) for t in configs["student_text"].output}
    if kind == "classification":
        assert outputs == {"label": [1], "scores": [3]}
        assert json.loads(configs["postprocess"].parameters["labels"].string_value) == list(labels)
    else:
        assert outputs == ({"sentence_embedding": [16]} if kind == "embedding" else {"logits": [-1, 99]})


def test_every_computing_model_gets_the_instances_and_the_batcher(tmp_path):
    graph = toy_graph(tmp_path / "toy.onnx", "classification")
    engine = tmp_path / "student.plan"
    engine.write_bytes(b"not a real engine")
    spec = RepositorySpec(
        graph, (engine, graph), minilm_tokenizer(), "classification", ("a", "b", "c"), 8, 128, 2, Batching((4, 8), 300)
    )
    summary = write_repository(tmp_path / "repo", spec)
    assert summary["instances"] == 2 and "preferred batch sizes 4, 8, queue delay 300 us" in summary["batching"]
    configs = parse_configs(tmp_path / "repo")
    kinds = {"student_trt": model_config_pb2.ModelInstanceGroup.KIND_GPU}
    for name in ("student_onnx", "student_trt", "tokenizer", "postprocess"):
        config = configs[name]
        kind = kinds.get(name, model_config_pb2.ModelInstanceGroup.KIND_CPU)
        assert [(g.count, g.kind) for g in config.instance_group] == [(2, kind)], name
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8], name
        assert config.dynamic_batching.max_queue_delay_microseconds == 300, name
    for name in ("student_text", "student_text_trt"):  # ensembles: Triton schedules them, no instances
        assert not configs[name].instance_group and not configs[name].HasField("dynamic_batching")
    default = RepositorySpec(graph, None, None, "classification", ("a", "b", "c"), 8, 128)
    write_repository(tmp_path / "default", default)
    onnx_model = parse_configs(tmp_path / "default")["student_onnx"]
    assert [g.count for g in onnx_model.instance_group] == [1]
    assert onnx_model.dynamic_batching.max_queue_delay_microseconds == 0  # no fixed delay: the measured policy's


def test_only_the_package_stage_reads_the_serve_section():
    """Runs made before ``serve`` existed keep every earlier stage: only the package stage's fingerprint moves."""
    config = PipelineConfig(model=ModelSource(random=RandomModel(family="bert")))
    batching = DynamicBatchingConfig(preferred_batch_sizes=(4,), max_queue_delay_us=100)
    served = dataclasses.replace(config, serve=ServeConfig(instances=2, dynamic_batching=batching))
    moved = [stage.name for stage in STAGES if stage.fingerprint(config, {}) != stage.fingerprint(served, {})]
    assert moved == ["package"]


def test_a_model_without_tokenizer_gets_only_its_graph_and_a_note(tmp_path):
    graph = toy_graph(tmp_path / "toy.onnx", "embedding")
    summary = write_repository(tmp_path / "repo", RepositorySpec(graph, None, None, "embedding", (), 4, 64))
    assert set(parse_configs(tmp_path / "repo")) == {"student_onnx"}
    assert "no tokenizer" in summary["note"]


def test_package_stage_of_a_real_run(text_run):
    manifest = json.loads((text_run / "manifest.json").read_text())
    entry = manifest["stages"]["package"]
    assert entry["status"] == "done"
    assert set(entry["summary"]["models"]) == {"student_onnx", "tokenizer", "postprocess", "student_text"}
    root = text_run / "package" / "model_repository"
    configs = parse_configs(root)
    check_against_graph(configs["student_onnx"], text_run / "export" / "student_qdq_cpu.onnx")
    check_ensemble(configs["student_text"], configs)
    assert (root / "student_onnx" / "1" / "model.onnx").read_bytes() == (
        text_run / "export" / "student_qdq_cpu.onnx"
    ).read_bytes()
    assert json.loads(configs["postprocess"].parameters["labels"].string_value) == list(LABELS)
    assert configs["tokenizer"].parameters["max_length"].string_value == str(MAX_LENGTH)
    assert all(c.max_batch_size == 4 for c in configs.values())  # the largest validated batch
    assert "package/model_repository/tokenizer/1/model.py" in entry["artifacts"]


def test_package_stage_on_a_random_model_without_tokenizer(write_config, cli, tmp_path):
    run = tmp_path / "run"
    config = write_config({"calib": {"method": "random-tokens"}, "export": {"formats": ["onnx", "triton"]}})
    result = cli("run", config, "--out", run, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "manifest.json").read_text())["stages"]["package"]["summary"]
    assert summary["models"] == {"student_onnx": "onnxruntime_onnx"} and "no tokenizer" in summary["note"]
    configs = parse_configs(run / "package" / "model_repository")
    check_against_graph(configs["student_onnx"], run / "export" / "student_qdq_cpu.onnx")


def test_package_stage_without_a_student_graph_fails_in_one_line(tmp_path):
    (tmp_path / "export").mkdir()
    config = PipelineConfig(model=ModelSource(random=RandomModel(family="bert")))
    ctx = StageContext(config, RunFolder(tmp_path), tmp_path / ".tmp-package", "", show_progress=False)
    with pytest.raises(PipelineError, match="no CPU student graph") as info:
        PackageStage().run(ctx)
    assert "\n" not in str(info.value)


def test_tokenizer_model_functions_refuse_bad_text_and_classify():
    tokenizer = minilm_tokenizer()
    ids, mask = encode(tokenizer, decode_texts(np.array([[b"a cat"], [b"two small dogs"]], dtype=object)), 8)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (2, 5)
    assert mask[0].tolist() == [1, 1, 1, 1, 0]
    for raw, reason in ((b"", "text 0 is empty"), (b"\xff", "not valid UTF-8")):
        with pytest.raises(InvalidRequest, match=reason):
            decode_texts(np.array([[raw]], dtype=object))
    with pytest.raises(InvalidRequest, match="text 1 is 12 tokens long; this model takes at most 8"):
        encode(tokenizer, ["ok", "one two three four five six seven eight nine ten"], 8)
    names, scores = classify(np.array([[0.0, 2.0], [1.0, -1.0]], dtype=np.float32), ["neg", "pos"])
    assert names.reshape(-1).tolist() == [b"pos", b"neg"]
    assert np.allclose(scores.sum(1), 1.0) and scores.dtype == np.float32


@pytest.mark.slow
def test_text_models_load_and_answer_in_a_real_triton_server(text_run, tmp_path):
    """The repository's own tokenizer and post-processing models (model.py + config.pbtxt, copied as they are)
    in the Triton server PyTriton bundles. Its only backend is Python, so the ONNX model and the ensemble that
    needs it are checked by the protobuf tests above, not loaded here."""
    from tritonclient.http import InferInput
    from tritonclient.utils import InferenceServerException

    repository = tmp_path / "repository"
    for name in ("tokenizer", "postprocess"):
        shutil.copytree(text_run / "package" / "model_repository" / name, repository / name)
    models = ["tokenizer", "postprocess"]
    with TritonServer(repository, models, free_ports(), tmp_path / "triton.log") as server:
        with InferenceServerClient(server.http_url) as client:
            texts = np.array([[b"a cat"], [b"two small dogs"]], dtype=object)
            text = InferInput("text", [2, 1], "BYTES")
            text.set_data_from_numpy(texts)
            result = client.infer("tokenizer", [text])
            expected = minilm_tokenizer()(["a cat", "two small dogs"], padding="longest", return_tensors="np")
            assert (result.as_numpy("input_ids") == expected["input_ids"]).all()
            assert (result.as_numpy("attention_mask") == expected["attention_mask"]).all()
            empty = InferInput("text", [1, 1], "BYTES")
            empty.set_data_from_numpy(np.array([[b""]], dtype=object))
            with pytest.raises(InferenceServerException, match="text 0 is empty") as refused:
                client.infer("tokenizer", [empty])
            assert refused.value.status() == "400"  # INVALID_ARG: the client's fault, not the server's
            logits = InferInput("logits", [2, 2], "FP32")
            logits.set_data_from_numpy(np.array([[0.0, 3.0], [1.0, 0.0]], dtype=np.float32))
            result = client.infer("postprocess", [logits])
            assert result.as_numpy("label").reshape(-1).tolist() == [b"positive", b"negative"]
            assert np.allclose(result.as_numpy("scores").sum(1), 1.0)
