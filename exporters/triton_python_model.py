"""Triton Python-backend model, copied into model repositories as ``model.py``. Its ``mode`` parameter says what
it does: ``tokenize`` (text -> ids and mask, tokenizer in ``1/tokenizer``), ``classify`` (logits -> label,
scores), ``text`` (text -> the task's outputs: tokenizer, the ONNX graph on ONNX Runtime and post-processing
in one model, for the Python-only Triton server that ``zsaq-pipeline serve`` runs), or ``generate`` (a prompt
and optional ``max_new_tokens`` -> the greedy continuation's text and token ids, through a causal LM's KV-cache
graph on ONNX Runtime).

It imports only numpy, transformers, onnxruntime and Triton's utils (and, for ``generate``, the copy of
:mod:`exporters.decoding` that lies beside it as ``decoding.py``): it runs inside Triton's Python stub, and the
tests and the serve load check call the same functions in-process.

A refused request gets an INVALID_ARG error (HTTP 400, gRPC INVALID_ARGUMENT) whose message is one line; the
refusal is logged at info level with the request's id. Other requests of a merged batch still run."""

from __future__ import annotations

import itertools
import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (the tests, the serve load check): only the functions are used
    pb_utils = None


REFUSED_METRIC = "zsaq_inference_request_refused"
TEXT_INPUT, NEW_TOKENS_INPUT = "text", "max_new_tokens"
GENERATED_TEXT, GENERATED_IDS = "generated_text", "generated_ids"
ENDED = -1  # generated_ids after a row's end-of-sequence token (or beyond its max_new_tokens)


class InvalidRequest(ValueError):
    """A request the model refuses; its message is what the client reads, ``reason`` a short label for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_texts(raw: np.ndarray) -> list[str]:
    """UTF-8 texts from a BYTES tensor (any shape); refuses an empty request, empty or undecodable text."""
    texts = []
    for i, item in enumerate(raw.reshape(-1)):
        try:
            text = bytes(item).decode("utf-8")
        except (TypeError, UnicodeDecodeError):
            raise InvalidRequest(f"text {i} is not valid UTF-8", "invalid_utf8") from None
        if not text.strip():
            raise InvalidRequest(f"text {i} is empty", "empty_text")
        texts.append(text)
    if not texts:
        raise InvalidRequest("the request holds no text", "no_text")
    return texts


def encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 input_ids and attention_mask padded to the longest text; refuses texts over ``max_length`` tokens."""
    enc = tokenizer(texts, padding="longest", truncation=False, return_tensors="np")
    for i, length in enumerate(enc["attention_mask"].sum(1)):
        if length > max_length:
            raise InvalidRequest(f"text {i} is {length} tokens long; this model takes at most {max_length}", "too_long")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def classify(logits: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Label names (BYTES, [batch, 1]) and softmax scores (float32, [batch, labels])."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    scores = (shifted / shifted.sum(-1, keepdims=True)).astype(np.float32)
    names = np.array([[labels[i].encode("utf-8")] for i in scores.argmax(-1)], dtype=np.object_)
    return names, scores


@dataclass
class TextModel:
    """Raw text to the task's outputs: the tokenizer, the student graph on ONNX Runtime, post-processing."""

    tokenizer: Any
    session: Any  # onnxruntime.InferenceSession
    task_kind: str
    labels: list[str]
    max_length: int

    @classmethod
    def load(cls, graph: str, tokenizer_dir: str, task_kind: str, labels: list[str], max_length: int, threads: int):
        """Load the tokenizer and an ONNX Runtime CPU session (``threads`` 0: all cores)."""
        import onnxruntime as ort
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        # right padding: the graphs take ids and mask only, so a text's tokens keep their positions whatever
        # it is batched with, and a causal LM's logits for them do not change
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return cls(tokenizer, session, task_kind, labels, max_length)

    def output_names(self) -> list[str]:
        """The names of the outputs each request gets."""
        return ["label", "scores"] if self.task_kind == "classification" else [self.session.get_outputs()[0].name]

    def check(self, raw: np.ndarray) -> tuple[list[str], int]:
        """A request's texts and its token length (its longest text's); raises InvalidRequest."""
        texts = decode_texts(raw)
        _, mask = encode(self.tokenizer, texts, self.max_length)
        return texts, int(mask.shape[1])

    def run(self, requests: list[tuple[list[str], int]]) -> list[dict[str, np.ndarray]]:
        """Outputs per checked request, computed in one batch; each equals what the request gets alone."""
        texts = [text for request_texts, _ in requests for text in request_texts]
        ids, mask = encode(self.tokenizer, texts, self.max_length)
        output = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        results, start = [], 0
        for request_texts, length in requests:
            rows = output[start : start + len(request_texts)]
            start += len(request_texts)
            if self.task_kind == "causal-lm":  # padded to the merged batch's length: cut to the request's own
                rows = rows[:, :length]
            if self.task_kind == "classification":
                names, scores = classify(rows, self.labels)
                results.append({"label": names, "scores": scores})
            else:
                results.append({self.output_names()[0]: np.ascontiguousarray(rows, dtype=np.float32)})
        return results

    def answer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's outputs, as the server answers it (``inputs``: the request's tensors by name)."""
        return self.run([self.check(inputs[TEXT_INPUT])])[0]

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The outputs of one request of ``texts``."""
        return self.answer({TEXT_INPUT: np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)})


def _decoding() -> ModuleType:
    """:mod:`exporters.decoding` in-process; inside Triton the copy beside ``model.py`` (the stub imports
    ``model.py`` as ``<version>.model`` and puts its folder on ``sys.path`` too)."""
    try:
        from . import decoding
    except ImportError:  # model.py imported as a top-level module
        import decoding
    return decoding


def kept_tokens(tokens: np.ndarray, cap: int, eos_id: int | None) -> list[int]:
    """A row's generated tokens: at most ``cap``, ending with the end-of-sequence token when it came."""
    kept = [int(token) for token in tokens[:cap]]
    if eos_id in kept:
        kept = kept[: kept.index(eos_id) + 1]
    return kept


@dataclass(frozen=True)
class Prompts:
    """A checked generation request: each text's token ids and how many tokens to generate for it at most."""

    ids: list[list[int]]
    new_tokens: list[int]


@dataclass
class GenerateModel:
    """A prompt to its greedy continuation: the tokenizer and a causal LM's KV-cache graph on ONNX Runtime
    (:func:`exporters.decoding.generate`). A prompt and the tokens asked for fit in ``max_length`` together."""

    tokenizer: Any
    stepper: Any  # decoding.OrtStepper
    max_length: int
    max_new_tokens: int  # the most a request may ask for
    default_new_tokens: int  # without max_new_tokens: this many, or as many as fit after the prompt when fewer

    @classmethod
    def load(cls, graph: str, tokenizer_dir: str, limits: tuple[int, int, int], threads: int) -> GenerateModel:
        """Load the tokenizer and the graph (``threads`` 0: all cores); ``limits``: (max_length, max_new_tokens,
        default_new_tokens)."""
        from transformers import AutoTokenizer

        stepper = _decoding().OrtStepper(Path(graph), threads)
        return cls(AutoTokenizer.from_pretrained(tokenizer_dir), stepper, *limits)

    def output_names(self) -> list[str]:
        """The names of the outputs each request gets."""
        return [GENERATED_TEXT, GENERATED_IDS]

    def _asked(self, raw: np.ndarray | None, count: int) -> list[int] | None:
        """The request's max_new_tokens per text (None: it names none); raises InvalidRequest."""
        if raw is None:
            return None
        values = [int(value) for value in raw.reshape(-1)]
        if len(values) != count:
            raise InvalidRequest(f"max_new_tokens has {len(values)} values for {count} texts", "new_tokens_count")
        for value in values:
            if not 1 <= value <= self.max_new_tokens:
                raise InvalidRequest(
                    f"max_new_tokens {value} is out of range: expected 1 to {self.max_new_tokens}", "new_tokens_range"
                )
        return values

    def check(self, raw_text: np.ndarray, raw_new: np.ndarray | None = None) -> Prompts:
        """A request's prompts as token ids and its new tokens per prompt; raises InvalidRequest."""
        texts = decode_texts(raw_text)
        asked = self._asked(raw_new, len(texts))
        ids = [list(row) for row in self.tokenizer(texts)["input_ids"]]
        new_tokens = []
        for i, prompt in enumerate(ids):
            if not prompt:
                raise InvalidRequest(f"text {i} has no tokens", "empty_text")
            room = self.max_length - len(prompt)
            if asked is None and room < 1:
                message = f"text {i} is {len(prompt)} tokens long; this model takes at most {self.max_length - 1}"
                raise InvalidRequest(message, "too_long")
            if asked is not None and asked[i] > room:
                message = (
                    f"text {i} is {len(prompt)} tokens long; with max_new_tokens {asked[i]} this model takes at "
                    f"most {self.max_length - asked[i]}"
                )
                raise InvalidRequest(message, "too_long")
            new_tokens.append(min(self.default_new_tokens, room) if asked is None else asked[i])
        return Prompts(ids, new_tokens)

    def run(self, requests: list[Prompts]) -> list[dict[str, np.ndarray]]:
        """Outputs per checked request, generated as one left-padded batch."""
        prompts = [prompt for request in requests for prompt in request.ids]
        caps = [new for request in requests for new in request.new_tokens]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        steps = np.stack(list(_decoding().generate(self.stepper, prompts, max(caps), pad, eos)), axis=1)
        rows = [kept_tokens(tokens, cap, eos) for tokens, cap in zip(steps, caps)]
        results, start = [], 0
        for request in requests:
            results.append(self._outputs(rows[start : start + len(request.ids)]))
            start += len(request.ids)
        return results

    def _outputs(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        ids = np.full((len(rows), max(len(row) for row in rows)), ENDED, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        texts = [[self._text(row)] for row in rows]
        return {GENERATED_TEXT: np.array(texts, dtype=np.object_), GENERATED_IDS: ids}

    def _text(self, row: list[int]) -> bytes:
        """The UTF-8 text of a row's tokens, its end-of-sequence token left out."""
        if row and row[-1] == self.tokenizer.eos_token_id:
            row = row[:-1]
        return self.tokenizer.decode(row, skip_special_tokens=True).encode("utf-8")

    def answer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's outputs, as the server answers it (``inputs``: the request's tensors by name)."""
        return self.run([self.check(inputs[TEXT_INPUT], inputs.get(NEW_TOKENS_INPUT))])[0]


class TritonPythonModel:
    """The Python backend's entry point."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the mode and its parameters from the model config; load what the mode needs."""
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.mode = params["mode"]
        self.request_ids = itertools.count(1)
        # Triton's Python backend reports every request of an execute call as a success, error response or
        # not: refusals are counted here, on Triton's metrics endpoint
        self.refused = pb_utils.MetricFamily(
            name=REFUSED_METRIC,
            description="Requests a model refused as invalid (answered INVALID_ARG), by model and reason",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.refused_by_reason: dict[str, Any] = {}  # kept alive: a deleted Metric leaves the endpoint
        self.model_name = args["model_name"]
        if self.mode == "tokenize":
            from transformers import AutoTokenizer

            folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.max_length = int(params["max_length"])
        elif self.mode == "classify":
            self.labels = json.loads(params["labels"])
        elif self.mode == "generate":
            version = Path(args["model_repository"]) / args["model_version"]  # relative paths: from here
            limits = (int(params["max_length"]), int(params["max_new_tokens"]), int(params["default_new_tokens"]))
            graph, tokenizer = (str(version / params[key]) for key in ("graph", "tokenizer"))
            self.batched = GenerateModel.load(graph, tokenizer, limits, int(params["threads"]))
        else:
            self.batched = TextModel.load(
                params["graph"],
                params["tokenizer"],
                params["task_kind"],
                json.loads(params["labels"]),
                int(params["max_length"]),
                int(params["threads"]),
            )

    def execute(self, requests: list) -> list:
        """One response per request; a refused request gets an error response and the others still run."""
        if self.mode in ("text", "generate"):
            return self._respond_batched(requests)
        return [self._respond(request) for request in requests]

    def _refuse(self, request: Any, exc: InvalidRequest) -> Any:
        request_id = request.request_id() or f"#{next(self.request_ids)}"
        pb_utils.Logger.log_info(f"request {request_id} refused: {exc}")
        if exc.reason not in self.refused_by_reason:
            labels = {"model": self.model_name, "reason": exc.reason}
            self.refused_by_reason[exc.reason] = self.refused.Metric(labels=labels)
        self.refused_by_reason[exc.reason].increment(1.0)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))

    def _respond(self, request: Any) -> Any:
        try:
            if self.mode == "tokenize":
                texts = decode_texts(pb_utils.get_input_tensor_by_name(request, TEXT_INPUT).as_numpy())
                ids, mask = encode(self.tokenizer, texts, self.max_length)
                tensors = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
            else:
                names, scores = classify(pb_utils.get_input_tensor_by_name(request, "logits").as_numpy(), self.labels)
                tensors = [pb_utils.Tensor("label", names), pb_utils.Tensor("scores", scores)]
        except InvalidRequest as exc:
            return self._refuse(request, exc)
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _check(self, request: Any) -> Any:
        """A request of the text or generate mode, checked (raises InvalidRequest)."""
        text = pb_utils.get_input_tensor_by_name(request, TEXT_INPUT).as_numpy()
        if self.mode == "text":
            return self.batched.check(text)
        new_tokens = pb_utils.get_input_tensor_by_name(request, NEW_TOKENS_INPUT)
        return self.batched.check(text, None if new_tokens is None else new_tokens.as_numpy())

    def _respond_batched(self, requests: list) -> list:
        """Check each request, run the accepted ones as one batch, answer all in their order."""
        responses: list[Any] = [None] * len(requests)
        accepted = []
        for i, request in enumerate(requests):
            try:
                accepted.append((i, self._check(request)))
            except InvalidRequest as exc:
                responses[i] = self._refuse(request, exc)
        if not accepted:
            return responses
        try:
            outputs = self.batched.run([checked for _, checked in accepted])
        except Exception:  # a fault of the server, not of a request: the traceback goes to the log only
            pb_utils.Logger.log_error(f"{self.model_name} failed on a batch:\n{traceback.format_exc()}")
            error = pb_utils.TritonError("the model failed on this batch; see the server log")
            for i, _ in accepted:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses
        for (i, _), values in zip(accepted, outputs):
            tensors = [pb_utils.Tensor(name, value) for name, value in values.items()]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
