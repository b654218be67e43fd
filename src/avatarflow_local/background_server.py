"""An HTTP server of the local runtime run on a daemon thread (the HTTP API, the issuer)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class BackgroundServer:
    """Mixin for the local runtime's servers: `self.server` serves on its own thread from
    `start()` until `stop()`.

    Example:
        class Issuer(BackgroundServer):
            thread_name = "local-issuer"

            def __init__(self):
                self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

        issuer = Issuer().start()  # ... issuer.stop()
    """

    server: ThreadingHTTPServer
    _thread: threading.Thread | None = None
    thread_name = "local-server"

    def start(self):
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)
