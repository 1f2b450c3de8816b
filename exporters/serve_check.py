"""``zsaq-pipeline serve --load-check``: a running server measured and probed as its users will meet it.

1. Answers: the load texts over HTTP and gRPC, alone and batched, equal the model run in-process (a
   generating model: greedy continuations of :data:`LOAD_NEW_TOKENS` tokens, token for token).
2. Load: perf_analyzer at each concurrency over HTTP and gRPC, and over HTTP against the same model without
   the dynamic batcher (:data:`~exporters.triton_serve.UNBATCHED_MODEL`) and with the other instance count
   (:func:`~exporters.triton_serve.twin_instances`: 1 vs 2 and more): throughput, p50/p99, queue and compute
   time, and the failures both sides counted.
3. Malformed requests: each gets a 4xx with a one-line reason (no traceback, no path), the server keeps
   serving, and the server's failure counters moved by what the clients saw fail (a generating model gets
   its own too: ``max_new_tokens`` out of range or of the wrong type, a prompt too long for the tokens it
   asks for)."""

from __future__ import annotations

import http.client
import json
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from exporters.http_front_door import FAILURE_METRIC
from exporters.perf_analyzer import Windows, measure, write_input_data
from exporters.triton_python_model import NEW_TOKENS_INPUT, REFUSED_METRIC, TEXT_INPUT, GenerateModel, TextModel
from exporters.triton_serve import MODEL_NAME, Endpoints, Variant

LOAD_TEXTS = (
    "A man is playing a guitar.",
    "The new movie is awesome, everyone should see it.",
    "Three dogs run across a snowy field.",
    "Stocks fell sharply after the report.",
    "She is reading a book in the garden while it rains.",
    "The cat sleeps.",
    "How do I reset my password?",
    "A woman slices an onion on a wooden board.",
)
CONCURRENCY = (1, 4, 16)
LOAD_NEW_TOKENS = 4  # a generating model's load: short continuations, so that each level measures many requests
TOLERANCE = 1e-4
TRITON_FAILURE_METRIC = "nv_inference_request_failure"
SERVER_PATH = re.compile(r"(/[\w.-]+){2,}\.(py|cc|h|so)\b|/(usr|home|tmp|opt|root|work)/")


# --- counters --------------------------------------------------------------------------------------------


def read_counters(metrics_url: str, model: str) -> dict[str, float]:
    """This model's failure counters on the metrics endpoint: Triton's, the model's refusals, the front door's."""
    host_port = metrics_url.split("//", 1)[1].split("/", 1)[0]
    connection = http.client.HTTPConnection(host_port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode("utf-8")
    connection.close()
    totals = dict.fromkeys((TRITON_FAILURE_METRIC, REFUSED_METRIC, FAILURE_METRIC), 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in totals and f'model="{model}"' in rest:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {name: round(after[name] - before[name]) for name in before}


# --- answers ---------------------------------------------------------------------------------------------

ServedModel = TextModel | GenerateModel


def load_extra(model: ServedModel) -> dict[str, int]:
    """The inputs a load-check request sends beside its texts, with their value for every text."""
    return {NEW_TOKENS_INPUT: LOAD_NEW_TOKENS} if isinstance(model, GenerateModel) else {}


def load_inputs(model: ServedModel, texts: list[str]) -> dict[str, np.ndarray]:
    """The tensors of a load-check request of ``texts``."""
    inputs = {TEXT_INPUT: np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)}
    for name, value in load_extra(model).items():
        inputs[name] = np.full((len(texts), 1), value, dtype=np.int32)
    return inputs


def _infer_inputs(module: Any, inputs: dict[str, np.ndarray]) -> list:
    """Triton client tensors (of ``module``: tritonclient.http or .grpc) holding ``inputs``."""
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def _client_results(
    endpoints: Endpoints, protocol: str, inputs: dict[str, np.ndarray], names: list[str]
) -> dict[str, Any]:
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    url = endpoints.http if protocol == "http" else endpoints.grpc
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(MODEL_NAME, _infer_inputs(module, inputs))
        return {name: result.as_numpy(name) for name in names}
    finally:
        client.close()


def _difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Largest absolute difference of the float outputs; infinite when labels or shapes differ."""
    worst = 0.0
    for name, expected in want.items():
        value = got[name]
        if value.shape != expected.shape:
            return float("inf")
        if expected.dtype == np.object_:
            if [bytes(v) for v in value.reshape(-1)] != [bytes(v) for v in expected.reshape(-1)]:
                return float("inf")
        else:
            worst = max(worst, float(np.abs(value - expected).max()))
    return worst


def _answer_difference(endpoints: Endpoints, protocol: str, model: ServedModel, texts: list[str]) -> float:
    """How far the server's answer to a load-check request of ``texts`` is from the model's in-process."""
    inputs = load_inputs(model, texts)
    return _difference(_client_results(endpoints, protocol, inputs, model.output_names()), model.answer(inputs))


def check_answers(endpoints: Endpoints, model: ServedModel, max_batch_size: int) -> dict[str, Any]:
    """Each load text alone and the texts in batches of ``max_batch_size``, over HTTP and gRPC, against the
    model in-process."""
    texts = list(LOAD_TEXTS)
    groups = [[t] for t in texts] + [texts[i : i + max_batch_size] for i in range(0, len(texts), max_batch_size)]
    result: dict[str, Any] = {"requests": 2 * len(groups), "tolerance": TOLERANCE}
    for protocol in ("http", "grpc"):
        result[f"{protocol}_max_abs_diff"] = max(_answer_difference(endpoints, protocol, model, g) for g in groups)
    result["passed"] = all(result[f"{p}_max_abs_diff"] <= TOLERANCE for p in ("http", "grpc"))
    return result


# --- load ------------------------------------------------------------------------------------------------


def _client_infer(endpoints: Endpoints, model: str, inputs: dict[str, np.ndarray]) -> None:
    import tritonclient.http as module

    with module.InferenceServerClient(endpoints.http) as client:
        client.infer(model, _infer_inputs(module, inputs))


def _warm_up(endpoints: Endpoints, variant: Variant, model: ServedModel) -> None:
    """Every load text three times, from as many clients at once as the model has instances (each instance
    answers some before it is measured)."""
    texts = [text for _ in range(3) for text in LOAD_TEXTS] * variant.instances
    with ThreadPoolExecutor(max_workers=variant.instances) as pool:
        list(pool.map(lambda text: _client_infer(endpoints, variant.name, load_inputs(model, [text])), texts))


def run_load(
    endpoints: Endpoints,
    reference: ServedModel,
    variants: list[Variant],
    concurrency: tuple[int, ...],
    windows: Windows,
    progress: Callable,
) -> list[dict[str, Any]]:
    """perf_analyzer levels: each of the ``variants`` (of ``reference``) over HTTP, the served one over gRPC too.
    Each concurrency measures them back to back, so the served model's and its twins' figures share the
    machine's state of the moment; every model answers every load text first (warm-up)."""
    plan = [("http", v) for v in variants] + [("grpc", v) for v in variants if v.role == "served"]
    for variant in variants:
        _warm_up(endpoints, variant, reference)
    levels = []
    with tempfile.TemporaryDirectory(prefix="zsaq-perf-") as scratch:
        data = write_input_data(Path(scratch) / "texts.json", list(LOAD_TEXTS), TEXT_INPUT, load_extra(reference))
        for level in concurrency:
            for protocol, variant in plan:
                model = variant.name
                url = endpoints.http if protocol == "http" else endpoints.grpc
                progress(f"perf_analyzer {protocol} {model} concurrency {level}")
                before = read_counters(endpoints.metrics, model)
                csv_path = Path(scratch) / f"{protocol}-{model}-{level}.csv"
                found = measure(url, protocol, model, level, data, TEXT_INPUT, csv_path, windows)
                failed = sum(_moved(before, read_counters(endpoints.metrics, model)).values())
                described = {"role": variant.role, "instances": variant.instances, "threads": variant.threads}
                row = {**found.as_dict(), **described, "batching": variant.batching is not None}
                levels.append({**row, "server_failures": failed})
    order = {(protocol, variant.name): i for i, (protocol, variant) in enumerate(plan)}
    return sorted(levels, key=lambda lv: (order[(lv["protocol"], lv["model"])], lv["concurrency"]))


def _compared(levels: list[dict[str, Any]], role: str) -> tuple[dict, dict, list[int]]:
    """The served model's and the ``role`` twin's completed HTTP levels by concurrency, and the concurrencies
    both have."""
    http = [lv for lv in levels if lv["protocol"] == "http" and lv["completed"]]
    served = {lv["concurrency"]: lv for lv in http if lv["role"] == "served"}
    twin = {lv["concurrency"]: lv for lv in http if lv["role"] == role}
    return served, twin, sorted(set(served) & set(twin))


def batching_effect(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Batched vs unbatched over HTTP at the highest concurrency measured: throughput ratio and p99s."""
    batched, unbatched, shared = _compared(levels, "unbatched")
    if not shared:
        return None
    top = shared[-1]
    return {
        "concurrency": top,
        "throughput_ratio": round(batched[top]["throughput"] / unbatched[top]["throughput"], 2),
        "p99_batched_ms": batched[top]["p99_ms"],
        "p99_unbatched_ms": unbatched[top]["p99_ms"],
    }


def instances_effect(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The served instance count vs the twin's over HTTP (both with the served batcher): at each concurrency
    both completed, throughput and p99 of each, and the throughput ratio of more instances to fewer."""
    served, twin, shared = _compared(levels, "instances")
    if not shared:
        return None
    rows = []
    for level in shared:
        fewer, more = sorted((served[level], twin[level]), key=lambda lv: lv["instances"])
        rows.append(
            {
                "concurrency": level,
                "throughput": {str(lv["instances"]): lv["throughput"] for lv in (fewer, more)},
                "p99_ms": {str(lv["instances"]): lv["p99_ms"] for lv in (fewer, more)},
                "throughput_ratio": round(more["throughput"] / fewer["throughput"], 2),
            }
        )
    counts = sorted({served[shared[0]]["instances"], twin[shared[0]]["instances"]})
    return {"protocol": "http", "instances": counts, "levels": rows}


# --- malformed requests ----------------------------------------------------------------------------------


def _post(endpoints: Endpoints, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    host, port = endpoints.http.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", f"/v2/models/{MODEL_NAME}/infer", body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def _json_body(*inputs: tuple[str, str, list[int], list]) -> bytes:
    """A JSON request of (name, datatype, shape, data) inputs."""
    tensors = [
        {"name": name, "datatype": datatype, "shape": shape, "data": data} for name, datatype, shape, data in inputs
    ]
    return json.dumps({"inputs": tensors}).encode()


def _json_request(datatype: str, shape: list[int], data: list) -> bytes:
    return _json_body((TEXT_INPUT, datatype, shape, data))


def _binary_request(raw: bytes) -> tuple[bytes, str]:
    """A one-text request with the text as raw bytes (Triton's binary tensor extension)."""
    from tritonclient.http import InferenceServerClient, InferInput

    tensor = InferInput(TEXT_INPUT, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[raw]], dtype=np.object_), binary_data=True)
    body, header_length = InferenceServerClient.generate_request_body([tensor])
    return body, str(header_length)


@dataclass(frozen=True)
class Malformed:
    """One malformed request: over HTTP a body and headers, over gRPC the text input's datatype and data and
    any ``extra`` (name, datatype, data) inputs; ``by_model``: the model refuses it (the server itself refuses
    the others before they reach a model)."""

    name: str
    by_model: bool
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    datatype: str = ""
    data: Any = None
    extra: tuple[tuple[str, str, Any], ...] = ()


def http_malformed(max_length: int, max_batch_size: int) -> list[Malformed]:
    """Each malformed HTTP request."""
    words = 2 * max_length + 8
    too_long = " ".join(["word"] * words)
    over = max_batch_size + 1
    binary, header_length = _binary_request(b"\xff\xfe")
    return [
        Malformed("wrong datatype (INT64)", False, _json_request("INT64", [1, 1], [7])),
        Malformed("wrong shape ([1, 2])", False, _json_request("BYTES", [1, 2], ["a", "b"])),
        Malformed("missing input", False, json.dumps({"inputs": []}).encode()),
        Malformed(f"batch of {over} (over {max_batch_size})", False, _json_request("BYTES", [over, 1], ["a"] * over)),
        Malformed("invalid JSON", False, b'{"inputs": [{"name": "text", '),
        Malformed("JSON that is not an object", False, b"[1, 2, 3]"),
        Malformed("empty text", True, _json_request("BYTES", [1, 1], [""])),
        Malformed(f"over-long text ({words} words)", True, _json_request("BYTES", [1, 1], [too_long])),
        Malformed("invalid UTF-8 (binary tensor)", True, binary, (("Inference-Header-Content-Length", header_length),)),
    ]


def grpc_malformed(max_length: int) -> list[Malformed]:
    """Each malformed gRPC request."""
    too_long = " ".join(["word"] * (2 * max_length + 8)).encode()
    return [
        Malformed("wrong datatype (INT64)", False, datatype="INT64", data=np.array([[7]], dtype=np.int64)),
        Malformed("empty text", True, datatype="BYTES", data=np.array([[b""]], dtype=np.object_)),
        Malformed("over-long text", True, datatype="BYTES", data=np.array([[too_long]], dtype=np.object_)),
        Malformed("invalid UTF-8", True, datatype="BYTES", data=np.array([[b"\xff\xfe"]], dtype=np.object_)),
    ]


def generation_malformed(model: GenerateModel) -> tuple[list[Malformed], list[Malformed]]:
    """Each malformed request of a generating model beside those of any text model, over HTTP and over gRPC:
    ``max_new_tokens`` out of range (0, one over the most) or of the wrong datatype, and a prompt that fits
    alone but not with the tokens it asks for."""
    prompt = LOAD_TEXTS[0]
    length = len(model.tokenizer(prompt)["input_ids"])
    crowded = model.max_length - length + 1  # one token more than the prompt leaves room for
    over = model.max_new_tokens + 1
    asks = [
        ("max_new_tokens 0", True, "INT32", 0),
        (f"max_new_tokens {over} (over {model.max_new_tokens})", True, "INT32", over),
        ("max_new_tokens of the wrong datatype (FP32)", False, "FP32", 4.0),
        (f"prompt of {length} tokens + max_new_tokens {crowded} (over {model.max_length})", True, "INT32", crowded),
    ]
    text = (TEXT_INPUT, "BYTES", [1, 1], [prompt])
    http_cases = [Malformed(n, by, _json_body(text, (NEW_TOKENS_INPUT, d, [1, 1], [v]))) for n, by, d, v in asks]
    data = np.array([[prompt.encode("utf-8")]], dtype=np.object_)
    numpy_type = {"INT32": np.int32, "FP32": np.float32}
    grpc_cases = [
        Malformed(n, by, datatype="BYTES", data=data, extra=((NEW_TOKENS_INPUT, d, np.full((1, 1), v, numpy_type[d])),))
        for n, by, d, v in asks
    ]
    return http_cases, grpc_cases


def malformed_cases(model: ServedModel, max_batch_size: int) -> tuple[list[Malformed], list[Malformed]]:
    """Every malformed request the load check sends to ``model``, over HTTP and over gRPC."""
    http_cases, grpc_cases = http_malformed(model.max_length, max_batch_size), grpc_malformed(model.max_length)
    if isinstance(model, GenerateModel):
        more_http, more_grpc = generation_malformed(model)
        return http_cases + more_http, grpc_cases + more_grpc
    return http_cases, grpc_cases


def _grpc_status(endpoints: Endpoints, case: Malformed) -> tuple[str, str]:
    from tritonclient.grpc import InferenceServerClient, InferInput
    from tritonclient.utils import InferenceServerException

    client = InferenceServerClient(endpoints.grpc)
    try:
        tensors = []
        for name, datatype, data in ((TEXT_INPUT, case.datatype, case.data), *case.extra):
            tensors.append(InferInput(name, list(data.shape), datatype))
            tensors[-1].set_data_from_numpy(data)
        client.infer(MODEL_NAME, tensors)
        return "OK", ""
    except InferenceServerException as exc:
        return str(exc.status()).replace("StatusCode.", ""), exc.message() or ""
    finally:
        client.close()


def _clean(body: str) -> dict[str, bool]:
    return {
        "one_line": "\n" not in body.strip(),
        "no_traceback": "Traceback" not in body and 'File "' not in body,
        "no_path": SERVER_PATH.search(body) is None,
    }


def _refused_cleanly(case: dict[str, Any]) -> bool:
    status_ok = case["status"].startswith("4") if case["protocol"] == "http" else case["status"] == "INVALID_ARGUMENT"
    return status_ok and case["one_line"] and case["no_traceback"] and case["no_path"]


def check_malformed(endpoints: Endpoints, model: ServedModel, max_batch_size: int) -> dict[str, Any]:
    """Every malformed request over HTTP and gRPC; each must be refused cleanly and leave the server serving;
    the failure counters must move by what the clients saw fail."""
    before = read_counters(endpoints.metrics, MODEL_NAME)
    http_cases, grpc_cases = malformed_cases(model, max_batch_size)
    cases = []
    for case in http_cases:
        status, body = _post(endpoints, case.body, dict(case.headers))
        try:
            reason = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            reason = body
        row = {"protocol": "http", "request": case.name, "status": str(status), "reason": reason}
        cases.append({**row, "by_model": case.by_model, **_clean(body)})
    for case in grpc_cases:
        status, reason = _grpc_status(endpoints, case)
        row = {"protocol": "grpc", "request": case.name, "status": status, "reason": reason}
        cases.append({**row, "by_model": case.by_model, **_clean(reason)})
    served_after = _answer_difference(endpoints, "http", model, [LOAD_TEXTS[0]])
    moved = _moved(before, read_counters(endpoints.metrics, MODEL_NAME))
    seen_http = sum(1 for c in cases if c["protocol"] == "http" and c["status"] != "200")
    seen_by_model = sum(1 for c in cases if c["by_model"] and c["status"] not in ("200", "OK"))
    counters = {
        "http_failures_seen": seen_http,
        FAILURE_METRIC: moved[FAILURE_METRIC],
        "model_refusals_seen": seen_by_model,
        REFUSED_METRIC: moved[REFUSED_METRIC],
        TRITON_FAILURE_METRIC: moved[TRITON_FAILURE_METRIC],
    }
    counted = seen_http == moved[FAILURE_METRIC] and seen_by_model == moved[REFUSED_METRIC]
    return {
        "cases": cases,
        "served_after": served_after <= TOLERANCE,
        "counters": counters,
        "passed": all(_refused_cleanly(c) for c in cases) and counted and served_after <= TOLERANCE,
    }


# --- the whole check -------------------------------------------------------------------------------------


def load_check(
    endpoints: Endpoints,
    model: ServedModel,
    max_batch_size: int,
    variants: list[Variant],
    concurrency: tuple[int, ...],
    windows: Windows,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Answers, load levels (the served model and its twins, ``variants``) and malformed requests against a
    running server; the report as a dict."""
    progress("answers over HTTP and gRPC")
    answers = check_answers(endpoints, model, max_batch_size)
    levels = run_load(endpoints, model, variants, concurrency, windows, progress)
    progress("malformed requests")
    malformed = check_malformed(endpoints, model, max_batch_size)
    loaded = all(lv["completed"] and lv["server_failures"] == 0 for lv in levels)
    from tritonclient.http import InferenceServerClient

    with InferenceServerClient(endpoints.http) as client:
        version = client.get_server_metadata()["version"]
    return {
        "server": f"Triton {version} (bundled with nvidia-pytriton {metadata.version('nvidia-pytriton')})",
        "perf_analyzer": f"tritonclient {metadata.version('tritonclient')}",
        "endpoints": {"http": endpoints.http, "grpc": endpoints.grpc, "metrics": endpoints.metrics},
        "windows": asdict(windows),
        "request": f"one prompt, {LOAD_NEW_TOKENS} new tokens" if isinstance(model, GenerateModel) else "one text",
        "answers": answers,
        "levels": levels,
        "batching_effect": batching_effect(levels),
        "instances_effect": instances_effect(levels),
        "malformed": malformed,
        "passed": answers["passed"] and loaded and malformed["passed"],
    }
