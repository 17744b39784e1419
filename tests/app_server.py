"""The web app as its users get it, for tests/test_app.py and tests/test_browser.py:
``python -m pv_jax.app`` started on a free localhost port, its gradio files in a temporary
folder, nothing sent anywhere but localhost (gradio's telemetry off)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# No telemetry from the server or from gradio_client in the tests.
QUIET_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclasses.dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        """The process runs and its page answers."""
        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.url, timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def rss_mb(self) -> float:
        """The server process's resident memory (MiB), from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(folder: Path, *args: str, timeout: float = 300):
    """Run ``python -m pv_jax.app ARGS`` (the toy model by default) until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **QUIET_ENV, "GRADIO_TEMP_DIR": str(folder / "gradio")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pv_jax.app", "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = Server(f"http://127.0.0.1:{port}/", proc, log_path)
        try:
            deadline = time.time() + timeout
            while not server.alive():
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the app did not start:\n{server.log_tail()}")
                time.sleep(0.5)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
