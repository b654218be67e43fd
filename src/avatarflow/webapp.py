"""What the web app needs from a deployment, in one place for both places that provide it:
the deploy-time publisher (functions/publish_web) writes `config.json` and the data bucket's
CORS rules in the cloud, and the local runtime (`make up`) serves the same document and sets
the same rules on its bucket. The app reads nothing else about its environment.
"""

from __future__ import annotations

from urllib.parse import urlsplit

# The photo checks the app makes before uploading mirror the API's (functions/api/app.py:
# MAX_UPLOAD_BYTES default) and the 10-15 photos; the workflow decides afterwards.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MIN_PHOTOS = 10
MAX_PHOTOS = 15
SCOPES = "openid email"
APP_PREFIX = "app/"  # the web bucket's one prefix: the distribution's origin path


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL: what CORS and CSP compare."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def app_config(*, api_base: str, client_id: str, authorize_url: str, token_url: str,
               logout_url: str | None, poll_ms: int = 3000) -> dict:
    """The app's /config.json (web/src/config.ts reads it)."""
    return {
        "apiBase": api_base,
        "clientId": client_id,
        "authorizeUrl": authorize_url,
        "tokenUrl": token_url,
        "logoutUrl": logout_url,
        "scopes": SCOPES,
        "maxUploadBytes": MAX_UPLOAD_BYTES,
        "minPhotos": MIN_PHOTOS,
        "maxPhotos": MAX_PHOTOS,
        "pollMs": poll_ms,
    }


def upload_cors_rules(app_origin: str) -> dict:
    """The data bucket's CORS configuration (PutBucketCors): the app's origin may POST the
    presigned upload forms and GET the presigned image URLs (to download them); nothing
    else, no other origin. ETag is exposed so an upload's answer can be read."""
    origin = origin_of(app_origin)
    return {"CORSRules": [{
        "AllowedOrigins": [origin],
        "AllowedMethods": ["POST", "GET"],
        "AllowedHeaders": ["*"],
        "ExposeHeaders": ["ETag"],
        "MaxAgeSeconds": 600,
    }]}
