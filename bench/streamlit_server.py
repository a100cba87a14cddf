"""Start and stop a real ``streamlit run`` server on a free loopback port (benchmarks and the
browser tests share it)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(script: Path, log_path: Path, *, env: dict | None = None, start_timeout_s: float = 90.0,
                     poll_s: float = 0.5, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``streamlit run <script>`` (headless, no file watcher) in the script's folder, on ``port``
    (default: a free one); yields (base URL, process) once ``/_stcore/health`` answers, and stops
    the server on exit."""
    script = Path(script).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless=true", f"--server.port={port}",
             "--server.address=127.0.0.1", "--server.fileWatcherType=none"],
            cwd=script.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + start_timeout_s
        try:
            while True:
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                    break
                except Exception:  # noqa: BLE001
                    if proc.poll() is not None:
                        raise RuntimeError(f"streamlit exited early; see {log_path}") from None
                    if time.time() > deadline:
                        raise RuntimeError(f"streamlit did not start within {start_timeout_s:.0f} s; see {log_path}") from None
                    time.sleep(poll_s)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
