"""Publishes the web app at deploy time (a CloudFormation custom resource, `WebAppPublication`).

The built app ships inside this function's package (`site/`, copied there by `make web-package`
before `sam build`); on Create and Update it:
  1. copies every file of `site/` to the app bucket under `app/` (the distribution's origin
     path) with its content type and cache policy (index.html revalidated, hashed assets a year),
     and deletes the `app/` objects an older deploy left (old hashed assets);
  2. writes `app/config.json` (avatarflow.webapp.app_config: the API on the app's own origin
     under /api, the user pool's client id and hosted-UI endpoints);
  3. puts the data bucket's CORS rules (avatarflow.webapp.upload_cors_rules: the app's origin may
     POST the presigned upload forms and GET the presigned images; CloudFormation cannot declare
     them on DataBucket: the distribution depends on the API, which depends on the bucket);
  4. when the stack made the user pool: turns on the authorization code grant for its app client
     with the distribution's URL as callback and sign-out URL (the client cannot name the
     distribution in the template either: the API's authorizer names the client). Every other
     setting of the client is read back and kept (UpdateUserPoolClient resets what it omits).
On Delete it empties `app/` (the app bucket is deleted with the stack) and removes the data
bucket's CORS rules (the data bucket is retained). The answer goes to CloudFormation's
presigned ResponseURL; a failure answers FAILED with the error's class, so a deploy fails
visibly instead of hanging for an hour.
"""

from __future__ import annotations

import json
import mimetypes
import urllib.request
from pathlib import Path

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from avatarflow import webapp

logger = Logger()
tracer = Tracer()
metrics = Metrics()

# Lambda's image may lack /etc/mime.types entries: the app's own types, stated.
for _type, _ext in (("text/javascript", ".js"), ("text/css", ".css"), ("application/json", ".json"),
                    ("image/svg+xml", ".svg"), ("text/html", ".html")):
    mimetypes.add_type(_type, _ext)
SITE_DIR = Path(__file__).resolve().parent / "site"
PREFIX = webapp.APP_PREFIX
# UpdateUserPoolClient sets what it is given and resets the rest: every writable setting
# DescribeUserPoolClient returns goes back unchanged but for the OAuth ones below.
CLIENT_KEYS = (
    "ClientName", "RefreshTokenValidity", "AccessTokenValidity", "IdTokenValidity", "TokenValidityUnits",
    "ReadAttributes", "WriteAttributes", "ExplicitAuthFlows", "SupportedIdentityProviders",
    "DefaultRedirectURI", "AnalyticsConfiguration", "PreventUserExistenceErrors",
    "EnableTokenRevocation", "EnablePropagateAdditionalUserContextData", "AuthSessionValidity",
    "RefreshTokenRotation",
)


def _files(site: Path) -> dict[str, Path]:
    if not (site / "index.html").is_file():
        raise FileNotFoundError("no site/index.html in the package: `make web-package` before `sam build`")
    return {PREFIX + p.relative_to(site).as_posix(): p for p in sorted(site.rglob("*")) if p.is_file()}


def _cache_control(key: str) -> str:
    # Vite names assets by content hash: they never change under one name.
    return "public, max-age=31536000, immutable" if key.startswith(PREFIX + "assets/") else "no-cache"


def _existing(s3, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def _configure_client(props: dict, callback: str) -> None:
    cognito = boto3.client("cognito-idp")
    current = cognito.describe_user_pool_client(UserPoolId=props["UserPoolId"],
                                                ClientId=props["ClientId"])["UserPoolClient"]
    settings = {k: current[k] for k in CLIENT_KEYS if k in current}
    settings.update(
        AllowedOAuthFlowsUserPoolClient=True,
        AllowedOAuthFlows=["code"],
        AllowedOAuthScopes=webapp.SCOPES.split(),
        CallbackURLs=[callback],
        LogoutURLs=[callback],
        SupportedIdentityProviders=["COGNITO"],
    )
    settings.pop("DefaultRedirectURI", None)  # must be one of CallbackURLs; ours is the only one
    cognito.update_user_pool_client(UserPoolId=props["UserPoolId"], ClientId=props["ClientId"], **settings)


@tracer.capture_method
def publish(props: dict, site: Path | None = None) -> dict:
    s3 = boto3.client("s3")
    site = site or SITE_DIR
    bucket, origin = props["AppBucket"], webapp.origin_of(props["AppOrigin"])
    files = _files(site)
    for key, path in files.items():
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ContentType=content_type,
                      CacheControl=_cache_control(key))
    hosted_ui = props.get("HostedUiUrl") or ""
    config = webapp.app_config(
        api_base="/api",
        client_id=props["ClientId"],
        authorize_url=props.get("AuthorizeUrl") or f"{hosted_ui}/oauth2/authorize",
        token_url=props.get("TokenUrl") or f"{hosted_ui}/oauth2/token",
        logout_url=f"{hosted_ui}/logout" if hosted_ui else None,
    )
    s3.put_object(Bucket=bucket, Key=PREFIX + "config.json", Body=json.dumps(config).encode(),
                  ContentType="application/json", CacheControl="no-cache")
    stale = _existing(s3, bucket) - set(files) - {PREFIX + "config.json"}
    for key in sorted(stale):
        s3.delete_object(Bucket=bucket, Key=key)
    s3.put_bucket_cors(Bucket=props["DataBucket"], CORSConfiguration=webapp.upload_cors_rules(origin))
    if props.get("UserPoolId"):
        _configure_client(props, f"{origin}/")
    metrics.add_metric(name="WebAppFilesPublished", unit=MetricUnit.Count, value=len(files))
    logger.info("web app published", extra={"files": len(files), "stale_removed": len(stale)})
    return {"Origin": origin, "Files": str(len(files))}


@tracer.capture_method
def unpublish(props: dict) -> None:
    s3 = boto3.client("s3")
    for key in sorted(_existing(s3, props["AppBucket"])):
        s3.delete_object(Bucket=props["AppBucket"], Key=key)
    s3.delete_bucket_cors(Bucket=props["DataBucket"])


def _answer(event: dict, context, status: str, reason: str = "", data: dict | None = None) -> None:
    body = json.dumps({
        "Status": status,
        "Reason": reason or f"see CloudWatch Logs stream {getattr(context, 'log_stream_name', '?')}",
        "PhysicalResourceId": event.get("PhysicalResourceId") or f"{event['StackId']}/web-app",
        "StackId": event["StackId"],
        "RequestId": event["RequestId"],
        "LogicalResourceId": event["LogicalResourceId"],
        "Data": data or {},
    }).encode()
    request = urllib.request.Request(event["ResponseURL"], data=body, method="PUT",  # noqa: S310
                                     headers={"Content-Type": "", "Content-Length": str(len(body))})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - CloudFormation's URL
        response.read()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context) -> dict:
    kind = event.get("RequestType")
    props = event.get("ResourceProperties", {})
    try:
        if kind == "Delete":
            unpublish(props)
            data = {}
        else:
            data = publish(props)
    except Exception as err:
        logger.exception("web app publication failed")
        if kind != "Delete":  # a failed clean-up must not block deleting the stack
            _answer(event, context, "FAILED", f"{kind} failed: {type(err).__name__}: {str(err)[:200]}")
            return {"Status": "FAILED"}
        data = {}
    _answer(event, context, "SUCCESS", "", data)
    return {"Status": "SUCCESS", **data}

