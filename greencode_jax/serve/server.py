"""A server: the engine, its metrics and the app on a bound socket, under uvicorn.

    server = Server(served, section)      # binds host:port (port 0: a free one)
    server.serve()                        # blocks; Ctrl-C / SIGTERM: uvicorn's graceful shutdown
    # or, in tests and benchmarks:
    with server.in_thread():
        httpx.get(server.url + "/health")

After uvicorn stops (open requests finished or cut after a grace period), the engine thread
is stopped: every job still queued or in a slot is cancelled.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from greencode_jax.errors import GreencodeError
from greencode_jax.serve.app import create_app
from greencode_jax.serve.energy import reply_energy
from greencode_jax.serve.engine import Engine
from greencode_jax.serve.sequential import SequentialEngine
from greencode_jax.serve.metrics import Observer

GRACEFUL_SHUTDOWN_S = 5
START_TIMEOUT_S = 60


class Server:
    def __init__(self, served, section, meter=None):
        self.served, self.section = served, section
        config = served.model.config
        engine = SequentialEngine if section.engine == "sequential" else Engine
        self.engine = engine(served.model, served.tokenizer, slots=section.slots,
                             max_context=min(section.max_context, config.max_position_embeddings),
                             max_queue=section.max_queue, tokens_per_step=section.tokens_per_step,
                             learned=served.learned, meter=meter)
        self.observer = Observer(served.name, config.num_layers, lambda: (self.engine.running, self.engine.waiting),
                                 lambda job: reply_energy(job, served.cost, config))
        self.engine.observer = self.observer
        self.app = create_app(served, self.engine, self.observer, section)
        self.socket = _bind(section.host, section.port)
        self.engine.warm_up()
        self.host, self.port = self.socket.getsockname()[:2]
        self._uvicorn = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _make_uvicorn(self):
        import uvicorn  # lazy: heavy, and only a server needs it

        config = uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self._uvicorn = uvicorn.Server(config)
        return self._uvicorn

    def serve(self):
        """Runs until SIGINT/SIGTERM (uvicorn's handlers), then stops the engine."""
        server = self._make_uvicorn()
        self.engine.start()
        try:
            server.run(sockets=[self.socket])
        finally:
            self.engine.stop()
            self.socket.close()

    @contextlib.contextmanager
    def in_thread(self):
        """The server on a thread for the block's duration (no signal handlers: not the main thread)."""
        server = self._make_uvicorn()
        self.engine.start()
        thread = threading.Thread(target=server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise GreencodeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(GRACEFUL_SHUTDOWN_S + 5)
            self.engine.stop()
            self.socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise GreencodeError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
