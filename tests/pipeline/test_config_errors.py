"""Bad configs: one line naming the key and what is expected, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from calib.errors import ConfigError
from exporters.config import DynamicBatchingConfig, ServeConfig
from pipeline.config import parse_config
from tests.models import save_tiny_bert_folder

BAD_CONFIGS = [
    # (override, key named in the message, words of the expectation)
    ({"quant": {"weights": {"bits": 3}}}, "quant.weights.bits", "2, 4 or 8"),
    ({"quant": {"activations": {"bits": 4}}}, "quant.activations.bits", "8 or 16"),
    ({"quant": {"weights": {"bits": "eight"}}}, "quant.weights.bits", "an integer"),
    ({"quant": {"weigths": {"bits": 8}}}, "quant.weigths", "unknown key"),
    ({"calib": {"sampels": 8}}, "calib.sampels", "unknown key"),
    ({"task": {"kind": "translation"}}, "task.kind", "embedding, classification, causal-lm"),
    ({"model": {"random": {"family": "t5"}}}, "model.random.family", "bert, gpt2, llama"),
    ({"model": {"path": "/nonexistent/model-folder"}}, "model", "exactly one of"),  # path beside TINY's random
    ({"calib": {"seq_len": 4096}}, "calib.seq_len", "at most 128"),
    ({"validate": {"shapes": [[1, 1024]]}}, "validate.shapes[0]", "at most 128"),
    (
        {
            "quant": {"weights": {"bits": 4, "granularity": "per-group", "group_size": 128}},
            "model": {"random": {"hidden": 96, "heads": 4, "intermediate": 192}},
        },
        "quant.weights.group_size",
        "divisor of every layer width",
    ),
    (
        {"quant": {"weights": {"bits": 4, "granularity": "per-group", "group_size": 48}}},
        "quant.weights.group_size",
        "32, 64 or 128",
    ),
    ({"calib": {"samples": 0}}, "calib.samples", "a positive integer"),
    ({"calib": {"generator": {"pairs": 1.5}}}, "calib.generator.pairs", "between 0 and 1"),
    (
        {
            "task": {"kind": "causal-lm"},
            "model": {"random": {"family": "gpt2"}},
            "calib": {"generator": {"pairs": 0.5}},
        },
        "calib.generator.pairs",
        "0 for a causal-lm teacher (sentence pairs are what a classifier of pairs reads)",
    ),
    ({"validate": {"min_agreement": 1.5}}, "validate.min_agreement", "between 0 and 1"),
    ({"export": {"formats": ["tflite"]}}, "export.formats[0]", "onnx, trt, triton"),
    ({"export": {"cpu_int8_weights": "int16"}}, "export.cpu_int8_weights", "auto, int8, uint8"),
    ({"quant": {"learn": {"lr": -1}}}, "quant.learn.lr", "positive"),
    ({"quant": {"learn": {"weights_lr": 0}}}, "quant.learn.weights_lr", "positive"),
    ({"calib": {"generator": {"radius": -0.1}}}, "calib.generator.radius", "0 or more"),
    ({"calib": {"generator": {"choose": -1}}}, "calib.generator.choose", "0 or more"),
    (
        {"quant": {"attention_matmuls": True, "activations": {"bits": 16}}},
        "quant.attention_matmuls",
        "false unless quant.activations.bits is 8",
    ),
    ({"quant": {"lm_head": True}}, "quant.lm_head", "false unless task.kind is causal-lm"),
    ({"quant": {"lm_head": "yes"}}, "quant.lm_head", "true or false"),
    ({"quant": {"kv_cache": True}}, "quant.kv_cache", "false unless task.kind is causal-lm"),
    ({"quant": {"activations": {"granularity": "per-row"}}}, "quant.activations.granularity", "per-tensor, per-block"),
    ({"quant": {"activations": {"block_size": 32}}}, "quant.activations.block_size", "no value unless"),
    ({"quant": {"weights": {"zero_point": True}}}, "quant.weights.zero_point", "false for per-channel 8-bit"),
    (
        {
            "quant": {
                "weights": {
                    "bits": 4,
                    "granularity": "per-group",
                    "group_size": 32,
                    "zero_point": True,
                    "init": "percentile",
                }
            }
        },
        "quant.weights.init",
        "minmax or mse with quant.weights.zero_point",
    ),
    ({"quant": {"activations": {"granularity": "per-block"}}}, "quant.activations.block_size", "16, 32, 64 or 128"),
    (
        {"quant": {"activations": {"granularity": "per-block", "block_size": 48}}},
        "quant.activations.block_size",
        "16, 32, 64, 128",
    ),
    (
        {
            "quant": {
                "weights": {"bits": 4, "granularity": "per-group", "group_size": 32},
                "activations": {"granularity": "per-block", "block_size": 64},
            }
        },
        "quant.activations.block_size",
        "the weights' group size (32)",
    ),
    (
        {
            "quant": {"activations": {"granularity": "per-block", "block_size": 128}},
            "model": {"random": {"hidden": 96, "heads": 4, "intermediate": 192}},
        },
        "quant.activations.block_size",
        "divisor of every layer width",
    ),
    # values that once passed this check and failed later (issue 21)
    ({"validate": {"shapes": []}}, "validate.shapes", "at least one [batch, sequence]"),
    ({"validate": {"samples": 0}}, "validate.samples", "a positive integer"),
    ({"validate": {"threads": -1}}, "validate.threads", "0 or more"),
    ({"validate": {"warmup": -5}}, "validate.warmup", "0 or more"),
    ({"calib": {"seed": 2**70}}, "calib.seed", "an integer from 0 to 2**63 - 1"),
    ({"calib": {"sam_sga": {"rho": float("nan")}}}, "calib.sam_sga.rho", "a finite number"),
    ({"quant": {"learn": {"lr": float("inf")}}}, "quant.learn.lr", "a finite number"),
    ({"task": {"eval": {"data": "x.tsv", "metric": "perplexity"}}}, "task.eval.metric", "accuracy or matthews"),
    ({"task": {"eval": {"data": "x.tsv", "metric": "accuracy", "limit": -1}}}, "task.eval.limit", "a positive"),
    ({"task": {"eval": {"data": "typo.tsv", "metric": "accuracy"}}}, "task.eval.data", "an existing file"),
    ({"calib": {"method": "real-data", "real_data": "gone.tsv"}}, "calib.real_data", "an existing task data file"),
    ({"calib": {"method": "teacher-sampled"}}, "calib.method", "teacher-sampled needs task.kind: causal-lm"),
    ({"export": {"opset": 99}}, "export.opset", "17 to 21"),
    ({"model": {"random": {"family": "bert", "kv_heads": 2}}}, "model.random.kv_heads", "grouped key/value heads"),
    # the serve section (issue 20): Triton's instances and dynamic batcher
    ({"serve": {"instances": 0}}, "serve.instances", "a positive integer"),
    ({"serve": {"instances": "two"}}, "serve.instances", "an integer"),
    ({"serve": {"instance": 2}}, "serve.instance", "unknown key"),
    ({"serve": {"dynamic_batching": [4]}}, "serve.dynamic_batching", "a mapping"),
    (
        {"serve": {"dynamic_batching": {"max_queue_delay_us": -1}}},
        "serve.dynamic_batching.max_queue_delay_us",
        "0 or more",
    ),
    (
        {"serve": {"dynamic_batching": {"preferred_batch_sizes": 4}}},
        "serve.dynamic_batching.preferred_batch_sizes",
        "a list",
    ),
    (
        {"serve": {"dynamic_batching": {"preferred_batch_sizes": [0]}}},
        "serve.dynamic_batching.preferred_batch_sizes[0]",
        "a positive integer",
    ),
    (
        {"serve": {"dynamic_batching": {"preferred_batch_sizes": [2, 8]}}},
        "serve.dynamic_batching.preferred_batch_sizes[1]",
        "at most the largest batch in validate.shapes (4, the served max batch), got 8",
    ),
]


@pytest.mark.parametrize(("override", "key", "expected"), BAD_CONFIGS, ids=[c[1] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(write_config, cli, tmp_path, override, key, expected):
    config = write_config(override)
    out = tmp_path / "run"
    result = cli("run", config, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0] and key in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
        ("task: {kind: embedding}\n", "model: required key is missing"),
    ],
)
def test_unreadable_config_files(write_config, cli, tmp_path, text, expected):
    config = write_config(text=text)
    result = cli("run", config, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_model_folder_and_package(write_config, cli, tmp_path):
    for model, expected in (
        ({"path": str(tmp_path / "nowhere")}, "model.path: no model folder"),
        ({"package": "no_such_package_xyz/model"}, "model.package: no installed Python package 'no_such_package_xyz'"),
    ):
        config = write_config(text=f"model: {model}\n".replace("'", '"'))
        result = cli("run", config, "--out", tmp_path / "run")
        assert result.exit_code == 2, result.output
        assert expected in result.stderr
        assert not (tmp_path / "run").exists()


def test_missing_config_file(cli, tmp_path):
    result = cli("run", tmp_path / "absent.yaml")
    assert result.exit_code == 2
    assert "config file not found" in result.stderr


def test_defaults_and_relative_paths_resolve_next_to_the_file(tmp_path):
    config = parse_config(
        {
            "model": {"path": "m"},
            "task": {"kind": "embedding", "eval": {"data": "d.tsv", "metric": "spearman", "optional": True}},
        },
        base_dir=tmp_path,
    )
    assert config.model.path == str(tmp_path / "m")
    assert config.task.eval.data == str(tmp_path / "d.tsv")
    assert config.quant.weights.bits == 8 and config.quant.activations.bits == 8
    assert config.validate.shapes == ((1, 128), (8, 128))


def test_the_serve_section_defaults_and_parses():
    base = {"model": {"random": {"family": "bert"}}}
    assert parse_config(base).serve == ServeConfig(instances=1, dynamic_batching=None)  # the measured policy
    given = {"instances": 2, "dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_us": 500}}
    serve = parse_config({**base, "serve": given}).serve
    assert serve.instances == 2 and serve.dynamic_batching == DynamicBatchingConfig((4, 8), 500)
    assert parse_config({**base, "serve": {"dynamic_batching": {}}}).serve.dynamic_batching == DynamicBatchingConfig()
    stored = parse_config({**base, "serve": given}).to_dict()["serve"]  # the manifest's form, which serve reads
    assert stored == {"instances": 2, "dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_us": 500}}


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="calib.samples: expected an integer"):
        parse_config({"model": {"random": {"family": "bert"}}, "calib": {"samples": True}})


def test_a_scheme_tensorrt_cannot_run_is_refused_before_any_work_with_export_trt(write_config, cli, tmp_path):
    config = write_config({"quant": {"weights": {"bits": 4, "granularity": "per-group", "group_size": 32}}})
    out = tmp_path / "run"
    result = cli("run", config, "--out", out, "--export", "trt")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert "quant.weights.group_size: expected 64 or 128 (TensorRT's 4-bit group sizes)" in line and "got 32" in line
    assert not out.exists()
    per_channel = write_config({"quant": {"weights": {"bits": 4}}}, name="w4.yaml")
    refused = cli("run", per_channel, "--out", out, "--export", "trt")
    assert refused.exit_code == 2 and "quant.weights.granularity: expected per-group" in refused.stderr
    assert not out.exists()
    decoder = {"model": {"random": {"family": "llama"}}, "task": {"kind": "causal-lm"}, "quant": {"kv_cache": True}}
    int8_cache = write_config(decoder, name="kv.yaml")
    refused = cli("run", int8_cache, "--out", out, "--export", "trt")
    assert refused.exit_code == 2 and "quant.kv_cache: expected false for export format trt" in refused.stderr
    assert not out.exists()
    dynamic = write_config({"quant": {"activations": {"granularity": "per-block", "block_size": 32}}}, name="dyn.yaml")
    refused = cli("run", dynamic, "--out", out, "--export", "trt")
    assert refused.exit_code == 2
    assert "quant.activations.granularity: expected per-tensor for TensorRT" in refused.stderr
    assert not out.exists()
    asymmetric = {"bits": 4, "granularity": "per-group", "group_size": 64, "zero_point": True}
    zero_points = write_config({"quant": {"weights": asymmetric}}, name="zp.yaml")
    refused = cli("run", zero_points, "--out", out, "--export", "trt")
    assert refused.exit_code == 2
    assert "quant.weights.zero_point: expected false for per-group 4-bit weights on TensorRT" in refused.stderr
    assert not out.exists()


def test_a_key_given_twice_is_refused(write_config, cli, tmp_path):
    config = write_config(text="model: {random: {family: bert}}\ncalib: {samples: 8}\ncalib: {samples: 16}\n")
    result = cli("run", config, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "line 3: the key 'calib' is given twice" in result.stderr
    assert not (tmp_path / "run").exists()


def test_files_the_config_names_are_opened_before_any_work(write_config, cli, tmp_path):
    """A truncated weight file or an evaluation file of the wrong shape: one line, exit 2, nothing written."""
    model = save_tiny_bert_folder(tmp_path / "model", ("good", "bad"))
    weights = model / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    source = {"model": {"path": str(model), "random": None}}
    result = cli("run", write_config(source), "--out", tmp_path / "run")
    assert result.exit_code == 2 and "model.safetensors is not a readable weight file" in result.stderr
    weights.write_bytes(intact)
    (tmp_path / "dev.tsv").write_text("sentence\tverdict\ngood\t1\n")
    evaluated = {**source, "task": {"eval": {"data": str(tmp_path / "dev.tsv"), "metric": "accuracy"}}}
    result = cli("run", write_config(evaluated), "--out", tmp_path / "run")
    assert result.exit_code == 2 and "dev.tsv: not a GLUE task file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_config_error_imports_no_torch(write_config):
    """Config errors come in well under a second: they are found before torch or transformers is imported."""
    probe = (
        "import sys\nfrom pipeline.cli import main\n"
        f"try:\n    main(['run', {str(write_config({'calib': {'samples': 0}}))!r}])\n"
        "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr


def test_a_one_label_classifier_is_a_regression_head_scored_by_spearman(tmp_path):
    data = tmp_path / "dev.tsv"
    data.write_text("sentence1\tsentence2\tscore\n", encoding="utf-8")
    task = {"kind": "classification", "num_labels": 1, "eval": {"data": str(data), "metric": "spearman"}}
    assert parse_config({"model": {"path": "m"}, "task": task}, base_dir=tmp_path).task.num_labels == 1
    with pytest.raises(ConfigError, match=r"task.eval.metric: expected spearman .* regression head"):
        parse_config({"model": {"path": "m"}, "task": {**task, "eval": {**task["eval"], "metric": "accuracy"}}})
