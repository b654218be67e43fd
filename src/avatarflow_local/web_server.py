"""The web app on 127.0.0.1, laid out as CloudFront serves it in the cloud (template.yaml
`WebDistribution`): the built app (web/dist) at /, `/config.json` beside it, and the HTTP API
under /api/* on the same origin (the prefix stripped, as the distribution's
`WebApiPrefixFunction` does), every answer with the security headers of the template's
`WebHeadersPolicy` (the CSP's origins made local: moto's S3 endpoint for the presigned
uploads and images, the local issuer for sign-in).

The proxy forwards the method, path, query, body and the viewer's headers but Host (the
managed AllViewerExceptHostHeader policy), so the API adapter sees what API Gateway would.
"""

from __future__ import annotations

import http.client
import json
import logging
import mimetypes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from avatarflow_local.background_server import BackgroundServer
from avatarflow_local.workflow_stack import TemplateResolver, load_template

LOG = logging.getLogger(__name__)
API_PREFIX = "/api"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
MAX_BODY = 10 * 1024 * 1024  # the HTTP API's payload quota; the adapter answers 413 itself above it
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")


def security_headers(data_origin: str, sign_in_origin: str, template: dict | None = None) -> dict[str, str]:
    """The template's WebHeadersPolicy as response headers, its CSP's two origin lists
    (`DataOrigins`, `SignInOrigin`) given local values; HSTS is left out (plain http)."""
    template = template or load_template()
    config = template["Resources"]["WebHeadersPolicy"]["Properties"]["ResponseHeadersPolicyConfig"]
    security = config["SecurityHeadersConfig"]
    text, _variables = security["ContentSecurityPolicy"]["ContentSecurityPolicy"]["Fn::Sub"]
    csp = TemplateResolver(template, "local")._sub(text, {"DataOrigins": data_origin,
                                                           "SignInOrigin": sign_in_origin})
    # upgrade-insecure-requests would send the browser to https://127.0.0.1: not locally.
    csp = "; ".join(d for d in csp.split("; ") if d != "upgrade-insecure-requests")
    headers = {
        "Content-Security-Policy": csp,
        "X-Frame-Options": security["FrameOptions"]["FrameOption"],
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": security["ReferrerPolicy"]["ReferrerPolicy"],
    }
    for item in config.get("CustomHeadersConfig", {}).get("Items", []):
        headers[item["Header"]] = item["Value"]
    return headers


class WebServer(BackgroundServer):
    """Static files + config.json + the /api/* proxy, with the distribution's headers."""

    thread_name = "web-app"

    def __init__(self, dist: Path, config: dict, api_url: str, headers: dict[str, str],
                 host: str = "127.0.0.1", port: int = 0):
        self.dist = Path(dist).resolve()
        if not (self.dist / "index.html").is_file():
            raise FileNotFoundError(f"{self.dist}/index.html: build the app first (make web)")
        self.config = config
        self.api = urlsplit(api_url)
        self.headers = headers
        self.server = ThreadingHTTPServer((host, port), self._handler_class())
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def file_for(self, path: str) -> Path | None:
        """The file a GET path names inside dist (None outside it or missing); / is index.html."""
        relative = path.lstrip("/") or "index.html"
        candidate = (self.dist / relative).resolve()
        if not candidate.is_relative_to(self.dist) or not candidate.is_file():
            return None
        return candidate

    def _handler_class(self):
        web = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "avatarflow-local-web"
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # noqa: A003 - stdlib name
                LOG.info("web %s", fmt % args)

            def _send(self, status: int, body: bytes, headers: dict[str, str]):
                self.send_response(status)
                for name, value in {**headers, **web.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    return self._send(413, b'{"message":"Request Entity Too Large"}',
                                      {"Content-Type": "application/json", "Connection": "close"})
                body = self.rfile.read(length) if length else None
                forward = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                path = self.path[len(API_PREFIX):]
                connection = http.client.HTTPConnection(web.api.hostname, web.api.port, timeout=60)
                try:
                    connection.request(self.command, path, body=body, headers=forward)
                    answer = connection.getresponse()
                    data = answer.read()
                    headers = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP}
                finally:
                    connection.close()
                self._send(answer.status, data, headers)

            def _serve(self):
                path = self.path.split("?", 1)[0]
                if path == "/config.json":
                    return self._send(200, json.dumps(web.config).encode(),
                                      {"Content-Type": "application/json", "Cache-Control": "no-cache"})
                found = web.file_for(path)
                if found is None:  # S3 through OAC answers a missing key 403 (no s3:ListBucket)
                    return self._send(403, b"Forbidden", {"Content-Type": "text/plain"})
                kind = mimetypes.guess_type(found.name)[0] or "application/octet-stream"
                cache = "public, max-age=31536000, immutable" if "/assets/" in path else "no-cache"
                self._send(200, found.read_bytes(), {"Content-Type": kind, "Cache-Control": cache})

            def _route(self):
                if self.path == API_PREFIX or self.path.startswith((API_PREFIX + "/", API_PREFIX + "?")):
                    return self._proxy()
                if self.command in ("GET", "HEAD"):
                    return self._serve()
                # The app's behaviour allows GET and HEAD only (CloudFront: 403 for others).
                return self._send(403, b"Forbidden", {"Content-Type": "text/plain"})

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _route  # noqa: N815

        return Handler
