"""Tiny in-process models shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from calib.models import TaskModel, load_backbone
from pipeline.config import ModelSource, RandomModel, TaskConfig

KIND_BY_FAMILY = {"bert": "classification", "gpt2": "causal-lm", "llama": "causal-lm"}


def tiny_teacher(family: str = "bert", kind: str | None = None, hidden: int = 64, seed: int = 0) -> TaskModel:
    """A random-init task model of the family (classification for BERT, causal LM otherwise)."""
    task = TaskConfig(kind=kind or KIND_BY_FAMILY[family])
    spec = RandomModel(family=family, hidden=hidden, intermediate=2 * hidden, seed=seed)
    return TaskModel(load_backbone(ModelSource(random=spec), task), task.kind).eval()


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
