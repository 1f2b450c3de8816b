"""``zsaq-pipeline serve --load-check``: a running server measured and probed as its users will meet it.

1. Answers: the load texts over HTTP and gRPC, alone and batched, equal the model run in-process.
2. Load: perf_analyzer at each concurrency over HTTP and gRPC, and over HTTP against the same model without
   the dynamic batcher (:data:`~exporters.triton_serve.UNBATCHED_MODEL`) and with the other instance count
   (:func:`~exporters.triton_serve.twin_instances`: 1 vs 2 and more): throughput, p50/p99, queue and compute
   time, and the failures both sides counted.
3. Malformed requests: each gets a 4xx with a one-line reason (no traceback, no path), the server keeps
   serving, and the server's failure counters moved by what the clients saw fail."""

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
from exporters.triton_python_model import REFUSED_METRIC, TextModel
from exporters.triton_repo import TEXT_INPUT
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


def _client_results(endpoints: Endpoints, protocol: str, texts: list[str], names: list[str]) -> dict[str, Any]:
    if protocol == "http":
        from tritonclient.http import InferenceServerClient, InferInput
    else:
        from tritonclient.grpc import InferenceServerClient, InferInput
    url = endpoints.http if protocol == "http" else endpoints.grpc
    client = InferenceServerClient(url)
    try:
        tensor = InferInput(TEXT_INPUT, [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_))
        result = client.infer(MODEL_NAME, [tensor])
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


def check_answers(endpoints: Endpoints, model: TextModel, max_batch_size: int) -> dict[str, Any]:
    """Each load text alone and the texts in batches of ``max_batch_size``, over HTTP and gRPC, against the
    model in-process."""
    texts = list(LOAD_TEXTS)
    groups = [[t] for t in texts] + [texts[i : i + max_batch_size] for i in range(0, len(texts), max_batch_size)]
    names = model.output_names()
    result: dict[str, Any] = {"requests": 2 * len(groups), "tolerance": TOLERANCE}
    for protocol in ("http", "grpc"):
        worst = max(_difference(_client_results(endpoints, protocol, g, names), model(g)) for g in groups)
        result[f"{protocol}_max_abs_diff"] = worst
    result["passed"] = all(result[f"{p}_max_abs_diff"] <= TOLERANCE for p in ("http", "grpc"))
    return result


# --- load ------------------------------------------------------------------------------------------------


def _client_infer(endpoints: Endpoints, model: str, texts: list[str]) -> None:
    from tritonclient.http import InferenceServerClient, InferInput

    with InferenceServerClient(endpoints.http) as client:
        tensor = InferInput(TEXT_INPUT, [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_))
        client.infer(model, [tensor])


def _warm_up(endpoints: Endpoints, variant: Variant) -> None:
    """Every load text three times, from as many clients at once as the model has instances (each instance
    answers some before it is measured)."""
    texts = [text for _ in range(3) for text in LOAD_TEXTS] * variant.instances
    with ThreadPoolExecutor(max_workers=variant.instances) as pool:
        list(pool.map(lambda text: _client_infer(endpoints, variant.name, [text]), texts))


def run_load(
    endpoints: Endpoints,
    variants: list[Variant],
    concurrency: tuple[int, ...],
    windows: Windows,
    progress: Callable,
) -> list[dict[str, Any]]:
    """perf_analyzer levels: each of the ``variants`` over HTTP, the served one over gRPC too. Each concurrency
    measures them back to back, so the served model's and its twins' figures share the machine's state of the
    moment; every model answers every load text first (warm-up)."""
    plan = [("http", v) for v in variants] + [("grpc", v) for v in variants if v.role == "served"]
    for variant in variants:
        _warm_up(endpoints, variant)
    levels = []
    with tempfile.TemporaryDirectory(prefix="zsaq-perf-") as scratch:
        data = write_input_data(Path(scratch) / "texts.json", list(LOAD_TEXTS), TEXT_INPUT)
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


def _json_request(datatype: str, shape: list[int], data: list) -> bytes:
    return json.dumps({"inputs": [{"name": TEXT_INPUT, "datatype": datatype, "shape": shape, "data": data}]}).encode()


def _binary_request(raw: bytes) -> tuple[bytes, str]:
    """A one-text request with the text as raw bytes (Triton's binary tensor extension)."""
    from tritonclient.http import InferenceServerClient, InferInput

    tensor = InferInput(TEXT_INPUT, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[raw]], dtype=np.object_), binary_data=True)
    body, header_length = InferenceServerClient.generate_request_body([tensor])
    return body, str(header_length)


@dataclass(frozen=True)
class Malformed:
    """One malformed request: over HTTP a body and headers, over gRPC a datatype and data; ``by_model``: the
    model refuses it (the server itself refuses the others before they reach a model)."""

    name: str
    by_model: bool
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    datatype: str = ""
    data: Any = None


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


def _grpc_status(endpoints: Endpoints, case: Malformed) -> tuple[str, str]:
    from tritonclient.grpc import InferenceServerClient, InferInput
    from tritonclient.utils import InferenceServerException

    client = InferenceServerClient(endpoints.grpc)
    try:
        tensor = InferInput(TEXT_INPUT, list(case.data.shape), case.datatype)
        tensor.set_data_from_numpy(case.data)
        client.infer(MODEL_NAME, [tensor])
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


def check_malformed(endpoints: Endpoints, model: TextModel, max_batch_size: int) -> dict[str, Any]:
    """Every malformed request over HTTP and gRPC; each must be refused cleanly and leave the server serving;
    the failure counters must move by what the clients saw fail."""
    before = read_counters(endpoints.metrics, MODEL_NAME)
    cases = []
    for case in http_malformed(model.max_length, max_batch_size):
        status, body = _post(endpoints, case.body, dict(case.headers))
        try:
            reason = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            reason = body
        row = {"protocol": "http", "request": case.name, "status": str(status), "reason": reason}
        cases.append({**row, "by_model": case.by_model, **_clean(body)})
    for case in grpc_malformed(model.max_length):
        status, reason = _grpc_status(endpoints, case)
        row = {"protocol": "grpc", "request": case.name, "status": status, "reason": reason}
        cases.append({**row, "by_model": case.by_model, **_clean(reason)})
    probe = [LOAD_TEXTS[0]]
    served_after = _difference(_client_results(endpoints, "http", probe, model.output_names()), model(probe))
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
    model: TextModel,
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
    levels = run_load(endpoints, variants, concurrency, windows, progress)
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
        "answers": answers,
        "levels": levels,
        "batching_effect": batching_effect(levels),
        "instances_effect": instances_effect(levels),
        "malformed": malformed,
        "passed": answers["passed"] and loaded and malformed["passed"],
    }
