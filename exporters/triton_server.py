"""The Triton server that the ``nvidia-pytriton`` wheel bundles (Triton 2.51, Python backend only), run as a
plain ``tritonserver`` process over a model repository: HTTP, gRPC and metrics on loopback, no restricted API,
so Triton's own clients and perf_analyzer drive it as they drive any Triton server.

PyTriton's Python front end is not used: it protects the statistics API with a random token (perf_analyzer
cannot send it) and turns every exception of a model into an HTTP 500 with its traceback."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from calib.errors import PipelineError, StageUnavailable

HOST = "127.0.0.1"
START_TIMEOUT_S, STOP_TIMEOUT_S = 180.0, 30.0


@dataclass(frozen=True)
class Ports:
    """HTTP, gRPC and metrics ports, all bound to :data:`HOST`."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def check_free(self) -> None:
        """One-line error for a port already in use, before the server starts."""
        for name, port in (("--port", self.http), ("--grpc-port", self.grpc), ("--metrics-port", self.metrics)):
            with socket.socket() as probe:
                try:
                    probe.bind((HOST, port))
                except OSError:
                    raise PipelineError(f"port {port} on {HOST} is in use; pass another with {name}") from None


def free_ports() -> Ports:
    """Three ports the system has free now (for load checks and tests)."""
    probes = [socket.socket() for _ in range(3)]
    try:
        for probe in probes:
            probe.bind((HOST, 0))
        return Ports(*(probe.getsockname()[1] for probe in probes))
    finally:
        for probe in probes:
            probe.close()


def require_server() -> None:
    """The bundled server and the Triton client come with the ``serve`` extra."""
    for module in ("pytriton", "tritonclient"):
        if importlib.util.find_spec(module) is None:
            raise StageUnavailable(f"serving needs the serve extra: pip install -e '.[serve]' ({module} is missing)")


def _server_tree(folder: Path) -> tuple[Path, dict[str, str]]:
    """The bundled server laid out with the stub for this Python (as PyTriton lays it out), and its environment:
    the Python backend's stub links this interpreter's libpython and imports from this environment."""
    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    shutil.copytree(get_root_module_path() / "tritonserver", folder, ignore=shutil.ignore_patterns("python_backend_*"))
    stub = get_stub_path(f"{sys.version_info.major}.{sys.version_info.minor}")
    shutil.copy(stub, folder / "backends" / "python" / "triton_python_backend_stub")
    libs = [sysconfig.get_config_var("LIBDIR"), str(get_libs_path()), os.environ.get("LD_LIBRARY_PATH", "")]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in libs if p)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return folder, env


class TritonServer:
    """``tritonserver`` over ``repository``, its output in ``log_file``; a context manager that waits until every
    model is ready and stops the server (SIGINT, then SIGKILL) on exit."""

    def __init__(self, repository: Path, models: list[str], ports: Ports, log_file: Path) -> None:
        self.repository, self.models, self.ports, self.log_file = repository, models, ports, log_file
        self.http_url, self.grpc_url = f"{HOST}:{ports.http}", f"{HOST}:{ports.grpc}"
        self.metrics_url = f"http://{HOST}:{ports.metrics}/metrics"
        self._process: subprocess.Popen | None = None
        self._tree: tempfile.TemporaryDirectory | None = None

    def command(self, server: Path) -> list[str]:
        """The server's command line: every endpoint on loopback, nothing restricted, the log in one file."""
        return [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--http-address={HOST}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",  # CPU only: no pinned pool (and no warning for lacking one)
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--log-file={self.log_file}",
        ]

    def __enter__(self) -> TritonServer:
        require_server()
        self.ports.check_free()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._tree = tempfile.TemporaryDirectory(prefix="zsaq-tritonserver-")
        server, env = _server_tree(Path(self._tree.name) / "tritonserver")
        with open(self.log_file, "ab") as log:
            # its own session: a Ctrl-C in the terminal reaches serve, which stops the server itself (and the
            # server's "Signal (2) received." goes to the log, not to the user's terminal)
            self._process = subprocess.Popen(
                self.command(server), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        from tritonclient.http import InferenceServerClient

        deadline = time.monotonic() + START_TIMEOUT_S
        with InferenceServerClient(self.http_url) as client:
            while True:
                if self._process.poll() is not None:
                    raise PipelineError(f"the Triton server exited at start ({self.last_error()}); see {self.log_file}")
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"the Triton server was not ready within {START_TIMEOUT_S:.0f} s; see {self.log_file}"
                    )
                try:
                    if all(client.is_model_ready(name) for name in self.models):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.3)

    def last_error(self) -> str:
        """The last error line of the server's log (what a failed start says)."""
        lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("E")] or lines or ["no output"]
        return errors[-1].split("] ", 1)[-1].strip()

    def is_alive(self) -> bool:
        """Whether the server process is still running."""
        return self._process is not None and self._process.poll() is None

    def wait(self) -> None:
        """Serve until SIGINT (Ctrl-C) or SIGTERM reaches this process, or until the server dies."""
        stopping = []
        previous = {sig: signal.signal(sig, lambda *_: stopping.append(1)) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.is_alive() and not stopping:
                time.sleep(0.3)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not stopping:
            raise PipelineError(f"the Triton server stopped ({self.last_error()}); see {self.log_file}")

    def stop(self) -> None:
        """SIGINT (Triton drains in-flight requests), SIGKILL after :data:`STOP_TIMEOUT_S`."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._tree is not None:
            self._tree.cleanup()
            self._tree = None

    def __exit__(self, *_: object) -> None:
        self.stop()
