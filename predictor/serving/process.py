"""A predictor in a child process: started, awaited until ready, stopped with SIGTERM.

What the demo, the serving tests and ``bench/serve.py`` share; in a cluster, Kubernetes does this job.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from predictor.config import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recsys_command() -> list[str]:
    return [shutil.which("recsys") or str(Path(sys.executable).parent / "recsys"), "serve"]


class ServerProcess:
    """``command --port PORT`` with the settings' stores in its environment (plus ``env``); ``with`` starts
    it and waits for ``ready_path`` (default ``/v2/models/<model>/ready``) to answer 200, leaving stops it.
    ``log`` holds its output."""

    def __init__(
        self,
        settings: Settings,
        env: dict | None = None,
        command: list[str] | None = None,
        log_path: Path | None = None,
        model: str = "recsys",
        timeout: float = 180.0,
        ready_path: str | None = None,
    ):
        self.settings, self.command, self.model, self.timeout = (
            settings,
            command or recsys_command(),
            model,
            timeout,
        )
        self.ready_path = ready_path or f"/v2/models/{model}/ready"
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or settings.home_dir / f"predictor-{self.port}.log"

    def __enter__(self):  # -> the instance (a subclass keeps its type)
        started = time.perf_counter()
        environ = {**os.environ, **self.settings.feast_environment(), **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w+")  # closed in __exit__
        self.proc = subprocess.Popen(
            [*self.command, "--port", str(self.port)], env=environ, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)
        while True:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(
                    f"{self.command} exited ({self.proc.returncode}):\n{self.output()[-3000:]}"
                )
            try:
                if self.client.get(self.ready_path).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > self.timeout:
                self.__exit__()
                raise RuntimeError(
                    f"{self.command} is not ready after {self.timeout:.0f} s:\n{self.output()[-3000:]}"
                )
            time.sleep(0.2)
        self.startup_seconds = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        started = time.perf_counter()
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.stop_seconds = time.perf_counter() - started

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
