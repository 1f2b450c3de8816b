"""A causal-LM run end to end: cached graphs validated (greedy tokens, cache consistency, decode latency in the
report), then ``zsaq-pipeline generate`` streaming from them, and its one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporters.decoding import OrtStepper, greedy_tokens
from pipeline.layout import REPORT_JSON, REPORT_MD
from tests.models import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory) -> Path:
    """A finished W8A8 run (int8 KV cache) of a tiny GGUF Llama with a byte-level BPE tokenizer."""
    pytest.importorskip("gguf", reason="GGUF sources need the [models] extra")
    from click.testing import CliRunner

    from pipeline.cli import main

    root = tmp_path_factory.mktemp("decoder")
    gguf_file = write_tiny_llama_gguf(root / "model")
    config = root / "c.yaml"
    config.write_text(
        f"model: {{path: {gguf_file.parent}, gguf_file: {gguf_file.name}}}\ntask: {{kind: causal-lm}}\n"
        "calib: {method: random-tokens, samples: 8, seq_len: 16, batch_size: 8}\n"
        "quant: {kv_cache: true}\n"  # the student's graphs keep an int8 cache, the teacher's a float one
        "export: {int4_weight_only: [32]}\n"
        "validate: {shapes: [[1, 16]], repeats: 2, warmup: 1, samples: 8,\n"
        "  decoder: {prompts: 4, new_tokens: 6, cache_windows: 1, past: 16, batches: [1, 2], repeats: 2}}\n"
    )
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(root / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_the_report_checks_every_cached_graph(decoder_run):
    report = json.loads((decoder_run / REPORT_JSON.stage / REPORT_JSON.name).read_text())
    decoding = report["decoding"]
    models = decoding["models"]
    assert set(models) == {
        "fp32-onnx", "qdq-cpu-flavour", "qdq-trt-flavour", "ort-dynamic-int8", "w4a16-g32-cpu",
    }  # fmt: skip
    assert models["fp32-onnx"]["reference"] == "fp32-pytorch"
    assert models["qdq-cpu-flavour"]["reference"] == "student-pytorch"
    assert models["fp32-onnx"]["greedy"]["exact"] == 4  # the float graph decodes what the float model does
    for name, row in models.items():
        assert row["cache"]["relative_difference"] < 1e-3, name
        assert [lat["batch"] for lat in row["latency"]] == [1, 2]
    markdown = (decoder_run / REPORT_MD.stage / REPORT_MD.name).read_text()
    assert "## Decoding (KV cache)" in markdown and "| fp32-onnx | fp32-pytorch | 4/4 |" in markdown


def test_the_students_graphs_keep_an_int8_cache(decoder_run, cli):
    for name, dtype in (("student_qdq_cpu", "int8"), ("student_qdq_trt", "int8"), ("teacher_fp32", "float32")):
        assert OrtStepper(decoder_run / "export" / f"{name}.onnx").layout.dtype == dtype, name
    result = cli("generate", decoder_run, "ab ba", "--max-new-tokens", "4")
    assert result.exit_code == 0 and result.stdout.startswith("ab ba"), result.output


def test_generate_streams_the_graphs_greedy_tokens(decoder_run, cli):
    result = cli("generate", decoder_run, "ab ba", "--max-new-tokens", "5", "--model", "teacher_fp32")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ab ba")
    assert "[teacher_fp32] prompt" in result.stderr and "tokens/s" in result.stderr
    from calib.models import load_saved_tokenizer

    tokenizer = load_saved_tokenizer(decoder_run / "teacher" / "model")
    stepper = OrtStepper(decoder_run / "export" / "teacher_fp32.onnx")
    tokens = greedy_tokens(stepper, tokenizer("ab ba")["input_ids"], 5)
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    assert result.stdout.rstrip("\n") == "ab ba" + tokenizer.decode(tokens, skip_special_tokens=True)


def test_sampled_generation_is_seeded(decoder_run, cli):
    args = ("generate", decoder_run, "ab", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "4")
    assert cli(*args).stdout == cli(*args).stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--model", "nope"), "--model: "),
        (("--max-new-tokens", "0"), "--max-new-tokens: expected 1 or more, got 0"),
        (("--temperature", "-1"), "--temperature and --top-k: expected 0 or more"),
    ],
)
def test_generate_refuses_bad_options_in_one_line(decoder_run, cli, args, expected):
    result = cli("generate", decoder_run, "ab", *args)
    assert result.exit_code != 0 and result.stderr.startswith("error: " + expected) and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_generate_refuses_an_empty_prompt_and_a_folder_that_is_no_run(decoder_run, cli, tmp_path):
    empty = cli("generate", decoder_run, "  ")
    assert empty.exit_code != 0 and empty.stderr.strip() == "error: prompt: expected some text, got an empty prompt"
    other = cli("generate", tmp_path, "ab")
    assert other.exit_code != 0 and "not a zsaq-pipeline run folder" in other.stderr


def test_generate_refuses_an_encoder_run(text_run, cli):
    result = cli("generate", text_run, "hello")
    assert result.exit_code != 0 and "has no KV cache: only a causal-LM run generates" in result.stderr


def test_chat_prompts_go_through_the_tokenizers_template(decoder_run, cli):
    refused = cli("generate", decoder_run, "ab", "--chat")
    assert refused.exit_code != 0
    assert refused.stderr.strip() == "error: --chat: the model's tokenizer has no chat template"
    from calib.models import load_saved_tokenizer

    folder = decoder_run / "teacher" / "model"
    tokenizer = load_saved_tokenizer(folder)
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}ba{% endif %}"
    tokenizer.chat_template = template  # "ab" as a user message -> "ab ba"
    tokenizer.save_pretrained(folder)
    result = cli("generate", decoder_run, "ab", "--chat", "--max-new-tokens", "3", "--model", "teacher_fp32")
    assert result.exit_code == 0, result.output
    stepper = OrtStepper(decoder_run / "export" / "teacher_fp32.onnx")
    tokens = greedy_tokens(stepper, tokenizer("ab ba", add_special_tokens=False)["input_ids"], 3)
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    assert result.stdout.rstrip("\n") == "ab\n" + tokenizer.decode(tokens, skip_special_tokens=True)
