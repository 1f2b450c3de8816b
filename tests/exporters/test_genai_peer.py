"""The ONNX Runtime GenAI peer: its config read into a cache layout, and (with onnxruntime-genai installed) an FP32
build of a tiny random Llama run through OrtStepper / run_full_sequence against our own FP32 graph, and through
scripts/decoder_peers.py beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from exporters.decoding import OrtStepper, cached_logits, decode_latencies, run_full_sequence, takes_positions
from exporters.genai_peer import CONFIG, build_peer, genai_graph, genai_layout, genai_stepper, graph_bytes
from exporters.metrics import token_nll
from exporters.onnx_export import export_onnx, teacher_export_model
from pipeline.layout import TEACHER_MODEL, TEACHER_ONNX
from tests.models import save_tiny_llama_folder
from tests.scripts import load_script

decoder_peers = load_script("decoder_peers")

DECODER = {
    "filename": "model.onnx",
    "head_size": 16,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "inputs": {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
    "outputs": {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
}


def _write_config(folder: Path, decoder: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps({"model": {"decoder": decoder}}), encoding="utf-8")
    return folder


def test_layout_and_graph_come_from_the_genai_config(tmp_path):
    folder = _write_config(tmp_path / "m", DECODER)
    layout = genai_layout(folder)
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (3, 2, 16)
    assert layout.past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert genai_graph(folder) == folder / "model.onnx"


def test_other_cache_names_or_no_config_are_refused(tmp_path):
    renamed = {**DECODER, "outputs": {**DECODER["outputs"], "present_key_names": "present_key.%d"}}
    with pytest.raises(ValueError, match="present_key_names"):
        genai_layout(_write_config(tmp_path / "renamed", renamed))
    with pytest.raises(FileNotFoundError, match="not an ONNX Runtime GenAI model folder"):
        genai_layout(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny random Llama folder, its FP32 GenAI build and our FP32 graph of the same weights."""
    pytest.importorskip("onnxruntime_genai", reason="the peer needs onnxruntime-genai (pip install --no-deps)")
    pytest.importorskip("onnx_ir", reason="onnxruntime-genai's model builder imports onnx-ir")
    base = tmp_path_factory.mktemp("genai")
    model = save_tiny_llama_folder(base / "hf")
    ours = base / "teacher_fp32.onnx"
    export_onnx(teacher_export_model(model), ours, 17)
    return base, build_peer(base / "hf", base / "peer", "fp32"), ours


def _windows(rows: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).integers(4, 104, size=(rows, seq), dtype=np.int64)


def test_the_build_is_recorded_and_reused(built):
    base, build, _ = built
    assert build.seconds > 0 and "-p fp32 -e cpu" in build.command
    again = build_peer(base / "no-such-model", base / "peer", "fp32")  # the record stands: no second build
    assert again == build
    files = ("model.onnx", "model.onnx.data")
    assert graph_bytes(genai_graph(build.folder)) == sum((build.folder / f).stat().st_size for f in files)


def test_a_failed_build_raises_the_builders_last_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_peer(tmp_path / "no-such-model", tmp_path / "peer", "fp32")
    pytest.importorskip("onnxruntime_genai", reason="the peer needs onnxruntime-genai (pip install --no-deps)")
    broken = tmp_path / "config-only"  # no weights, no tokenizer
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(RuntimeError, match=r"builder failed \(exit \d+\): \S"):
        build_peer(broken, tmp_path / "peer", "fp32")
    assert (tmp_path / "peer" / "build.log").is_file() and not (tmp_path / "peer" / "build.json").exists()


def test_the_peer_matches_our_fp32_graph_on_whole_windows(built):
    _, build, ours_path = built
    ours, peer = OrtStepper(ours_path, threads=1), genai_stepper(build.folder, threads=1)
    assert takes_positions(ours.session) and not takes_positions(peer.session)
    assert peer.layout == ours.layout  # the same layers, 2 key/value heads, head width 16
    ids = _windows(3, 48)
    mask = np.ones_like(ids)
    want = run_full_sequence(ours.session, ids, mask)
    got = run_full_sequence(peer.session, ids, mask, peer.layout)
    np.testing.assert_allclose(got, want, atol=1e-4)
    ppl = [np.exp(np.divide(*token_nll(logits, ids, mask))) for logits in (got, want)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)


def test_the_peer_decodes_on_its_cache_and_is_timed_beside_ours(built):
    _, build, ours_path = built
    peer = genai_stepper(build.folder, threads=1)
    ids = _windows(2, 24)
    full = run_full_sequence(peer.session, ids, np.ones_like(ids), peer.layout)
    np.testing.assert_allclose(cached_logits(peer, ids, prefill=16), full, atol=1e-4)
    latencies = decode_latencies({"ours": OrtStepper(ours_path, threads=1), "peer": peer}, (1, 2), 16, 2)
    assert [lat.batch for lat in latencies["peer"]] == [1, 2]
    assert all(lat.prefill_ms > 0 and lat.decode_ms > 0 for rows in latencies.values() for lat in rows)


def test_the_script_scores_a_run_and_its_peer_side_by_side(built, tmp_path):
    base, build, ours = built
    run, out, text = tmp_path / "run", tmp_path / "out", tmp_path / "text.raw"
    shutil.copytree(base / "hf", TEACHER_MODEL.path(run))
    TEACHER_ONNX.path(run).parent.mkdir()
    shutil.copy(ours, TEACHER_ONNX.path(run))
    shutil.copytree(build.folder, out / decoder_peers.PEER)  # the FP32 build stands in for int4: no second build
    text.write_text(" ".join(f"w{i - 4}" for i in _windows(1, 80)[0]), encoding="utf-8")
    settings = ["--windows", "2", "--seq-len", "32", "--past", "16", "--repeats", "2", "--threads", "1"]
    result = CliRunner().invoke(decoder_peers.main, [str(run), "--out", str(out), "--data", str(text), *settings])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "decoder_peers.json").read_text(encoding="utf-8"))
    rows = report["models"]
    assert list(rows) == ["teacher_fp32", decoder_peers.PEER]
    assert rows[decoder_peers.PEER]["perplexity"] == pytest.approx(rows["teacher_fp32"]["perplexity"], rel=1e-3)
    assert all(lat["tokens_per_second"] > 0 for row in rows.values() for lat in row["latency"])
    table = (out / "decoder_peers.md").read_text(encoding="utf-8")
    assert report["machine"] in table and build.command in table and "| genai_int4_cpu |" in table
    assert (out / decoder_peers.PEER / ".gitignore").read_text(encoding="utf-8") == "*\n"


def test_the_script_needs_a_teacher_folder(tmp_path):
    text = tmp_path / "text.raw"
    text.write_text("w1 w2", encoding="utf-8")
    result = CliRunner().invoke(decoder_peers.main, [str(tmp_path), "--data", str(text), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no teacher/model/config.json" in result.output
