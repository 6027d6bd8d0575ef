"""A server on a thread of this process, on a free loopback port: for notebooks, tests and
benchmarks that talk to the API while holding the model themselves.

    with BackgroundServer(create_app(served, scheduler, metrics)) as url:
        openai.OpenAI(base_url=f"{url}/v1", api_key="none")...
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self._sock = socket.socket()
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name="gptjax-http")

    def start(self, timeout: float = 30) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self.url

    def wait(self) -> None:
        """Serve until the server stops (or the process is killed)."""
        self._thread.join()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
