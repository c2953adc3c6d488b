"""Start ``mtrl serve`` as a child process on this machine and wait until it answers.

For local multi-server setups, tests and benchmarks::

    with LocalServer("runs/base", lora_rank=16, slots=64) as server:
        ... rollout.servers=[server.url] ...

The server runs in its own session (process group); :meth:`LocalServer.stop` (and leaving the
``with`` block, also on an error) sends it SIGTERM, waits, then kills the group, so no server
outlives its user.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from mtrl_jax.serving.protocol import HEALTH


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's choice; another process may take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """``mtrl serve --model PATH`` on 127.0.0.1 and a free port.

    Args:
      model: the HF-format model folder to serve.
      lora_rank, lora_alpha, slots, max_len: ``mtrl serve``'s options of the same names
        (``None``: its default).
      log: a file path for the server's stdout and stderr (default: inherited).
      startup_timeout_s: how long :meth:`start` waits for ``/health`` to answer.
    """

    def __init__(self, model: str, *, lora_rank: int | None = None,
                 lora_alpha: float | None = None, slots: int | None = None,
                 max_len: int | None = None, log: str | None = None,
                 startup_timeout_s: float = 180.0, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "mtrl_jax.cli", "serve", "--model", model,
                     "--port", str(self.port)]
        for flag, value in (("--lora-rank", lora_rank), ("--lora-alpha", lora_alpha),
                            ("--slots", slots), ("--max-len", max_len)):
            if value is not None:
                self.args += [flag, str(value)]
        self.args += list(extra_args)
        self.log = log
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def launch(self) -> LocalServer:
        """Start the process without waiting (start several, then :meth:`wait_healthy` each)."""
        out = open(self.log, "w") if self.log else None
        try:
            self.proc = subprocess.Popen(self.args, stdout=out,
                                         stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True)
        finally:
            if out is not None:
                out.close()
        return self

    def wait_healthy(self) -> LocalServer:
        """Poll ``/health`` until it answers; raises if the process exits or time runs out."""
        assert self.proc is not None, "launch() first"
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mtrl serve exited with {self.proc.returncode} before "
                                   f"answering on {self.url}"
                                   + (f" (its log: {self.log})" if self.log else ""))
            try:
                urllib.request.urlopen(self.url + HEALTH, timeout=1).read()
                return self
            except OSError:
                if time.monotonic() - t0 > self.startup_timeout_s:
                    self.stop()
                    raise TimeoutError(f"mtrl serve on {self.url} did not answer /health "
                                       f"within {self.startup_timeout_s:.0f} s") from None
                time.sleep(0.3)

    def start(self) -> LocalServer:
        return self.launch().wait_healthy()

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL the process group; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything the server started, and the server itself if SIGTERM did not end it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
