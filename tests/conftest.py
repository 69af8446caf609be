"""Shared fixtures: tiny checkpoints of real architectures, and a real server process."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

API_KEY = "tml-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python tinkercloud.py` as a real subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, models: dict[str, Path], workers: int = 1, log_name: str = "server.log",
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.data_dir, self.models, self.workers, self.extra_args = Path(data_dir), models, workers, extra_args
        self.extra_env = dict(env or {})  # on top of this process's environment
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / log_name
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180, attempts: int = 3) -> "ServerProcess":
        """Start the server; if another process took its port in the meantime, again on a new one."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError as e:
                if "address already in use" not in str(e) or attempt == attempts - 1:
                    raise
                self.stop()
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "tinkercloud.py"), "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--workers", str(self.workers), "--api-key", API_KEY]
        for name, path in self.models.items():
            cmd += ["--model", f"{name}={path}"]
        cmd += list(self.extra_args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               # micro-batches of 2**27 logits on any machine (the default depends on its memory)
               "TINKERCLOUD_MICROBATCH_LOGITS": str(1 << 27), **self.extra_env}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.tail()}")

    def health(self) -> tuple[int, dict]:
        import json
        import urllib.error

        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init Qwen3 and Llama checkpoints with the real Qwen tokenizer."""
    from scripts.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        "tiny-qwen3": Path(make_tiny_model(str(root / "tiny-qwen3"), "qwen3", seed=1)),
        "tiny-llama": Path(make_tiny_model(str(root / "tiny-llama"), "llama", seed=2)),
    }


@pytest.fixture(scope="session")
def server(tiny_models, tmp_path_factory):
    """One server process with one CPU worker, serving both tiny models."""
    srv = ServerProcess(tmp_path_factory.mktemp("server"), tiny_models).start()
    yield srv
    srv.stop()


@pytest.fixture()
def service_client(server):
    import tinker

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client


@pytest.fixture(scope="session")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["tiny-qwen3"]))


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave at once: SDK clients keep non-daemon heartbeat threads that can hold the
    interpreter open for minutes after the servers they talk to are gone."""
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
