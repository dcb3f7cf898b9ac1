"""Run the app under uvicorn: `serve(settings)` blocks (the CLI and pods), `start_in_thread` does not.

    from finetune.server.serving import serve, start_in_thread
    from finetune.server.settings import ServerSettings, graceful_shutdown_seconds

    serve(ServerSettings(model_dir=Path("out/model"), port=8080))         # blocks until SIGTERM/Ctrl-C
    with start_in_thread(ServerSettings(model_dir=Path("out/model"), port=0)) as server:
        print(server.url)                                                  # ready to answer
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from finetune.cli import UserError
from finetune.server.settings import ServerSettings, graceful_shutdown_seconds

logger = logging.getLogger(__name__)


class ServeError(UserError):
    """The server could not start: not a model directory, unreadable token file, model failed to load.

    A `finetune.cli.UserError`, so any command that serves (`serve`, `run`) prints it as one line, exit 2.
    """


def check_settings(settings: ServerSettings) -> None:
    """Fail fast, before binding a port, on mistakes a user can fix."""
    from finetune.server.model_runner import ModelLoadError, ModelRunner

    if not settings.model_dir.is_dir():
        raise ServeError(f"--model {settings.model_dir}: no such directory")
    try:
        ModelRunner(settings.model_dir, name=settings.name)
    except (ModelLoadError, ValueError) as err:
        raise ServeError(f"--model {settings.model_dir}: {err}") from None
    try:
        settings.bearer_token()
    except (OSError, ValueError) as err:
        raise ServeError(f"auth token: {err}") from None


def _connection_cap(wanted: int) -> int:
    """Open connections allowed: `wanted`, kept below the file-descriptor limit (model files, the
    feedback store, the listening socket and the log need some)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(2, min(wanted, soft - 64)) if soft != resource.RLIM_INFINITY else wanted


def _uvicorn_server(settings: ServerSettings, *, own_process: bool) -> object:
    import uvicorn

    from finetune.server.app import create_app
    from finetune.server.connections import ConnectionLimits, GuardedHttpToolsProtocol

    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s, max_connections=_connection_cap(settings.max_connections),
    )
    config = uvicorn.Config(
        create_app(settings, freeze_gc=own_process),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        http=GuardedHttpToolsProtocol.with_limits(limits),
        ws="none",
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        access_log=False,  # the request metrics carry the same information without a line per request
        # SIGTERM: uvicorn stops accepting, waits this long for in-flight requests, then the lifespan
        # drains the batch queue and closes the feedback store.
        timeout_graceful_shutdown=graceful_shutdown_seconds(settings.request_timeout_s),
        log_config=None,  # keep the process's logging setup (finetune.cli configures it)
    )
    return uvicorn.Server(config)


def serve(settings: ServerSettings) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain gracefully. Blocks; raises ServeError on bad settings."""
    check_settings(settings)
    server = _uvicorn_server(settings, own_process=True)
    logger.info("serving %s on http://%s:%d", settings.model_dir, settings.host, settings.port)
    server.run()  # type: ignore[attr-defined]


@dataclass
class RunningServer:
    """A server on a background thread. `url` is its base URL; `stop()` shuts it down gracefully."""

    url: str
    _server: object
    _thread: threading.Thread
    name: str = ""
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 30.0) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.should_exit = True  # type: ignore[attr-defined]
            self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def start_in_thread(settings: ServerSettings, ready_timeout: float = 300.0) -> RunningServer:
    """Start the server on a daemon thread and return once /readyz would say ready (port 0 = any free port).

    Signals are left to the main thread (uvicorn only installs handlers there), so call `stop()`.
    """
    check_settings(settings)
    server = _uvicorn_server(settings, own_process=False)
    thread = threading.Thread(target=server.run, name="finetune-serve", daemon=True)  # type: ignore[attr-defined]
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.02)
    if not server.started:  # type: ignore[attr-defined]
        server.should_exit = True  # type: ignore[attr-defined]
        raise ServeError(f"the server did not start on {settings.host}:{settings.port}")
    port = server.servers[0].sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    state = server.config.app.state.server  # type: ignore[attr-defined]
    running = RunningServer(f"http://{settings.host}:{port}", server, thread)
    while not (state.ready or state.load_error) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not state.ready:
        running.stop()
        raise ServeError(f"the model did not become ready: {state.load_error or 'timed out'}")
    running.name = state.runner.name
    return running
