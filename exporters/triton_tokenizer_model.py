"""Triton Python-backend model of the text ensemble, copied into the repository as ``model.py``: ``mode``
``tokenize`` (text -> ids and mask, tokenizer in ``1/tokenizer``) or ``classify`` (logits -> label, scores).
It imports only numpy, transformers and Triton's utils; ``zsaq-pipeline serve`` uses the same functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (zsaq-pipeline serve, tests): only the functions are used
    pb_utils = None


class InvalidRequest(ValueError):
    """A request the model refuses; its message is what the client reads."""


def decode_texts(raw: np.ndarray) -> list[str]:
    """UTF-8 texts from a BYTES tensor (any shape); refuses an empty request, empty or undecodable text."""
    texts = []
    for i, item in enumerate(raw.reshape(-1)):
        try:
            text = bytes(item).decode("utf-8")
        except (TypeError, UnicodeDecodeError):
            raise InvalidRequest(f"text {i} is not valid UTF-8") from None
        if not text.strip():
            raise InvalidRequest(f"text {i} is empty")
        texts.append(text)
    if not texts:
        raise InvalidRequest("the request holds no text")
    return texts


def encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 input_ids and attention_mask padded to the longest text; refuses texts over ``max_length`` tokens."""
    enc = tokenizer(texts, padding="longest", truncation=False, return_tensors="np")
    for i, length in enumerate(enc["attention_mask"].sum(1)):
        if length > max_length:
            raise InvalidRequest(f"text {i} is {length} tokens long; this model takes at most {max_length}")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def classify(logits: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Label names (BYTES, [batch, 1]) and softmax scores (float32, [batch, labels])."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    scores = (shifted / shifted.sum(-1, keepdims=True)).astype(np.float32)
    names = np.array([[labels[i].encode("utf-8")] for i in scores.argmax(-1)], dtype=np.object_)
    return names, scores


class TritonPythonModel:
    """The Python backend's entry point."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the mode and its parameters from the model config; load the tokenizer."""
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.mode = params["mode"]
        if self.mode == "tokenize":
            from transformers import AutoTokenizer

            folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.max_length = int(params["max_length"])
        else:
            self.labels = json.loads(params["labels"])

    def execute(self, requests: list) -> list:
        """One response per request; a refused request gets an error response and the others still run."""
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        try:
            if self.mode == "tokenize":
                texts = decode_texts(pb_utils.get_input_tensor_by_name(request, "text").as_numpy())
                ids, mask = encode(self.tokenizer, texts, self.max_length)
                tensors = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
            else:
                names, scores = classify(pb_utils.get_input_tensor_by_name(request, "logits").as_numpy(), self.labels)
                tensors = [pb_utils.Tensor("label", names), pb_utils.Tensor("scores", scores)]
        except InvalidRequest as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        return pb_utils.InferenceResponse(output_tensors=tensors)
