"""The web app's hosting as template.yaml declares it (CloudFront + private bucket + OAC, the
API under /api/*, security headers, the optional web ACL, the sign-in domain), and the local
server that plays the distribution in `make up` (web_server.py): same layout, the template's
headers, the /api/* proxy, nothing served from outside the built app."""

import json
import urllib.error
import urllib.request

import pytest
from http_stub import QuietHandler, serving

from avatarflow import webapp
from avatarflow_local.web_server import WebServer, security_headers
from avatarflow_local.workflow_stack import load_template

TEMPLATE = load_template()
RES = TEMPLATE["Resources"]


def test_the_app_bucket_is_private_encrypted_tls_only_and_readable_by_the_distribution_alone():
    props = RES["WebBucket"]["Properties"]
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    statements = RES["WebBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    deny, allow = statements
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert allow["Principal"] == {"Service": "cloudfront.amazonaws.com"} and allow["Action"] == "s3:GetObject"
    assert "${WebDistribution}" in allow["Condition"]["StringEquals"]["AWS:SourceArn"]["Fn::Sub"]
    assert allow["Resource"] == {"Fn::Sub": "${WebBucket.Arn}/" + webapp.APP_PREFIX + "*"}


def test_one_distribution_serves_the_app_through_oac_and_the_api_under_api():
    config = RES["WebDistribution"]["Properties"]["DistributionConfig"]
    origins = {o["Id"]: o for o in config["Origins"]}
    assert origins["app"]["OriginAccessControlId"] == {"Fn::GetAtt": ["WebOriginAccessControl", "Id"]}
    assert origins["app"]["OriginPath"] == "/" + webapp.APP_PREFIX.rstrip("/")
    assert "${GenerationApi}.execute-api" in origins["api"]["DomainName"]["Fn::Sub"]
    assert origins["api"]["CustomOriginConfig"]["OriginProtocolPolicy"] == "https-only"
    (api,) = config["CacheBehaviors"]
    assert api["PathPattern"] == "/api/*" and api["TargetOriginId"] == "api"
    assert {"POST", "DELETE", "OPTIONS"} <= set(api["AllowedMethods"])
    assert api["CachePolicyId"] == "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"  # CachingDisabled
    (strip,) = api["FunctionAssociations"]
    assert strip["EventType"] == "viewer-request"
    code = RES["WebApiPrefixFunction"]["Properties"]["FunctionCode"]
    assert 'replace(/^\\/api(?=\\/)/, "")' in code
    for behaviour in (config["DefaultCacheBehavior"], api):
        assert behaviour["ResponseHeadersPolicyId"] == {"Ref": "WebHeadersPolicy"}
        assert behaviour["ViewerProtocolPolicy"] in ("redirect-to-https", "https-only")


def test_the_web_acl_is_optional_and_made_only_where_cloudfront_allows_it():
    config = RES["WebDistribution"]["Properties"]["DistributionConfig"]
    assert config["WebACLId"] == {"Fn::If": ["HasWebAclArn", {"Ref": "WebAclArn"},
                                             {"Fn::If": ["MakeWebAcl", {"Fn::GetAtt": ["WebAcl", "Arn"]},
                                                         {"Ref": "AWS::NoValue"}]}]}
    acl = RES["WebAcl"]
    assert acl["Condition"] == "MakeWebAcl" and acl["Properties"]["Scope"] == "CLOUDFRONT"
    rules = {r["Name"]: r for r in acl["Properties"]["Rules"]}
    assert rules["RateLimitPerIp"]["Statement"]["RateBasedStatement"]["Limit"] == {"Ref": "WebRateLimit"}
    assert {"AWSManagedRulesCommonRuleSet", "AWSManagedRulesKnownBadInputsRuleSet"} <= set(rules)
    rule = TEMPLATE["Rules"]["WebAclOnlyInUsEast1"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "CreateWebAcl"}, "true"]}
    assert {"Fn::Equals": [{"Ref": "AWS::Region"}, "us-east-1"]} in [a["Assert"] for a in rule["Assertions"]]


def test_the_api_allows_no_other_browser_origin_by_default():
    assert TEMPLATE["Parameters"]["CorsAllowOrigin"]["Default"] == ""
    cors = RES["GenerationApi"]["Properties"]["CorsConfiguration"]["AllowOrigins"]
    assert cors == {"Fn::If": ["HasCorsAllowOrigin", [{"Ref": "CorsAllowOrigin"}], []]}


def test_the_headers_policy_and_the_local_server_send_the_same_headers():
    security = RES["WebHeadersPolicy"]["Properties"]["ResponseHeadersPolicyConfig"]["SecurityHeadersConfig"]
    assert security["StrictTransportSecurity"]["AccessControlMaxAgeSec"] >= 31536000
    assert security["FrameOptions"]["FrameOption"] == "DENY"
    headers = security_headers("http://127.0.0.1:4566", "http://127.0.0.1:4568")
    directives = dict(d.split(" ", 1) for d in headers["Content-Security-Policy"].split("; "))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
    assert directives["connect-src"] == "'self' http://127.0.0.1:4566 http://127.0.0.1:4568"
    assert directives["img-src"] == "'self' http://127.0.0.1:4566"
    assert "unsafe" not in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer"


def test_the_publication_gets_what_the_app_needs_and_reruns_with_a_new_build():
    props = RES["WebAppPublication"]["Properties"]
    assert props["CodeVersion"] == {"Ref": "PublishWebFunction.Version"}
    assert props["AppOrigin"] == {"Fn::Sub": "https://${WebDistribution.DomainName}"}
    assert props["DataBucket"] == {"Ref": "DataBucket"} and props["AppBucket"] == {"Ref": "WebBucket"}
    assert RES["UserPoolDomain"]["Condition"] == "CreateUserPool"
    assert TEMPLATE["Outputs"]["WebAppUrl"]["Value"] == {"Fn::Sub": "https://${WebDistribution.DomainName}/"}


# --------------------------------------------------------------------------- the local distribution


@pytest.fixture
def api():
    """A stand-in HTTP API that echoes what reached it."""
    seen = []

    class Handler(QuietHandler):
        def _echo(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({"method": self.command, "path": self.path, "body": body.decode(),
                         "authorization": self.headers.get("Authorization"),
                         "host": self.headers.get("Host")})
            data = json.dumps({"ok": True}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "7")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _echo  # noqa: N815

    with serving(Handler) as url:
        yield url, seen


@pytest.fixture
def web(tmp_path, api):
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><main>app</main>")
    (dist / "assets" / "app-1.js").write_text("1")
    (tmp_path / "secret.txt").write_text("outside")
    headers = security_headers("http://127.0.0.1:1", "http://127.0.0.1:2")
    server = WebServer(dist, {"apiBase": "/api"}, api[0], headers).start()
    yield server
    server.stop()


def fetch(url, method="GET", body=None, headers=None):
    request = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def test_local_server_serves_the_app_and_config_with_the_distribution_headers(web):
    status, body, headers = fetch(web.url + "/")
    assert (status, body) == (200, b"<!doctype html><main>app</main>")
    assert headers["Content-Type"] == "text/html" and headers["Cache-Control"] == "no-cache"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    status, body, headers = fetch(web.url + "/assets/app-1.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript"
    assert "immutable" in headers["Cache-Control"]
    assert json.loads(fetch(web.url + "/config.json")[1]) == {"apiBase": "/api"}


@pytest.mark.parametrize("path", ["/../secret.txt", "/%2e%2e/secret.txt", "/assets/../../secret.txt",
                                  "/nope.js"])
def test_local_server_serves_nothing_outside_the_built_app(web, path):
    status, body, headers = fetch(web.url + path)
    assert status == 403 and b"outside" not in body
    assert "Content-Security-Policy" in headers


def test_local_server_routes_api_to_the_api_without_the_prefix(web, api):
    _, seen = api
    status, body, headers = fetch(web.url + "/api/users/ada/generations?x=1", "POST", b'{"prompt": "p"}',
                                  {"Authorization": "Bearer t", "Content-Type": "application/json"})
    assert (status, json.loads(body)) == (201, {"ok": True})
    assert headers["Retry-After"] == "7" and "Content-Security-Policy" in headers
    (request,) = seen
    assert request["method"] == "POST" and request["path"] == "/users/ada/generations?x=1"
    assert request["body"] == '{"prompt": "p"}' and request["authorization"] == "Bearer t"
    assert request["host"] == api[0].removeprefix("http://")  # the API's own Host, as CloudFront sends
    # Only /api/ is the API's: other methods on the app are refused, as the app behaviour allows GET/HEAD.
    assert fetch(web.url + "/apiary", "POST", b"x")[0] == 403
    assert len(seen) == 1
