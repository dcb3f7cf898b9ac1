"""A stand-in for the API server's FineTuneJob status endpoint, over HTTPS like the real one: it records
the merge patches a real trainer sends (tests/real_runs.py), so the operator's tests read those instead
of writing their own."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

TOKEN = "stand-in-service-account-token"


class StatusCapture:
    """`with StatusCapture(folder) as api:` the env a trainer pod needs to reach it (`api.env`), and
    every patch it received (`api.patches`: path, bearer token, content type, body)."""

    def __init__(self, folder: Path) -> None:
        import trustme

        ca = trustme.CA()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(TOKEN)
        ca.cert_pem.write_to_path(str(folder / "ca.crt"))
        self.patches: list[dict[str, Any]] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.env = {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self._server.server_address[1]),
            "FINETUNE_SERVICE_ACCOUNT_DIR": str(folder),
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        patches = self.patches

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                patches.append({"path": self.path, "authorization": self.headers.get("authorization"),
                                "content_type": self.headers.get("content-type"), "body": json.loads(body)})
                answer = b"{}"
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> StatusCapture:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
