"""Property-based fuzzing (hypothesis) of everything that reads untrusted input.

- image decoding (faces.decode_image, faces.analyze_photo) on random bytes and on mutated
  real JPEG/PNG/WEBP/HEIC photos: a result or a PhotoRejected, never another exception;
- ids and S3 keys (ids.validate_id, keys.parse_upload_key and the key builders) on path
  traversal, unicode look-alikes, overlong parts, `../`, `%2F`, NUL bytes: InvalidIdError /
  InvalidKeyError, or a key that stays inside its prefix;
- the generation API (functions/api) on random methods, paths, headers, claims and bodies,
  against moto: a 2xx or a 4xx with a JSON body, never a 5xx or an exception.

The budget is FUZZ_EXAMPLES examples per target (default 150, so `make test` stays fast;
`make fuzz` runs 10,000). With FUZZ_REPORT=<path>, the inputs tried per target are written
there as JSON (bench/fuzz.py reads it)."""

import base64
import json
import os
import posixpath
import zlib
from collections import Counter
from functools import cache
from urllib.parse import quote

import pytest
from apitools import answer_invoke_endpoint_async, body_of, http_event, put_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from unit_stack import UnitStack, local_stack

from avatarflow import faces, keys
from avatarflow.ids import ID_PATTERN, InvalidIdError, validate_id
from avatarflow.keys import InvalidKeyError
from avatarflow.sample_photos import encode, photo

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
TRIED: Counter = Counter()
OUTCOMES: dict[str, Counter] = {}


def outcome(target: str, what: str) -> None:
    """Where the inputs went (rejection reasons, status codes): a fuzzer that only ever hits
    the first check is not testing much."""
    OUTCOMES.setdefault(target, Counter())[what] += 1


def budget(share: float = 1.0):
    """Examples for one target; a costly target takes a share of the small `make test` budget
    and the full budget in `make fuzz`."""
    return settings(
        max_examples=max(10, int(EXAMPLES * (share if EXAMPLES <= 1000 else 1.0))),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("FUZZ_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"examples_per_target": EXAMPLES, "tried": dict(TRIED),
                       "outcomes": {k: dict(v.most_common()) for k, v in OUTCOMES.items()}}, handle, indent=1)


# --------------------------------------------------------------------------- ids and keys

# Pieces an attacker would try in a path part: traversal, encoded slashes, NULs, unicode
# look-alikes (fullwidth solidus, one-dot leader, RTL override), whitespace and overlong runs.
NASTY = [
    "..", ".", "/", "\\", "%2F", "%2f", "%2E%2E", "%00", "\x00", "\n", " ", "+", "%20", "~", "$", "*",
    "\uff0f", "\u2024", "\u202e", "\u0130", "\ufb01", "é", "A\u0301", "\U0001f600", "a" * 64, "a" * 65,
    "uploads", "datasets", "alice", "batch-1", "x_y", "-a", "_a", "a", "Z9",
]
valid_ids = st.from_regex(ID_PATTERN, fullmatch=True)
nasty = st.lists(st.sampled_from(NASTY), min_size=1, max_size=6).map("".join)
# Valid ids, valid ids with something nasty spliced in, and pure junk, in about equal parts.
parts = st.one_of(
    valid_ids,
    st.builds(lambda a, n, b: a + n + b, valid_ids, nasty, st.sampled_from(["", "x", "1"])),
    nasty,
    st.text(max_size=70),
)
names = st.one_of(
    st.sampled_from(["photo.jpg", "IMG_0001.HEIC", "request.json", "a b.png", "ü.webp"]),
    st.builds(lambda a, n: a + n, st.sampled_from(["photo", "x.jpg", ""]), nasty),
    parts,
    st.sampled_from([".hidden", "a/b.jpg", "x" * 256, "..", "."]),
)
upload_keys = st.one_of(
    st.text(max_size=300),
    st.builds(lambda u, b, n: f"uploads/{u}/{b}/{n}", parts, parts, names),
    # Valid ids, so the file name and the encoding are what is under test.
    st.builds(lambda u, b, n: f"uploads/{u}/{b}/{n}", valid_ids, valid_ids, names),
    st.builds(lambda u, b, n, safe: f"uploads/{u}/{b}/{quote(n, safe=safe)}", valid_ids, valid_ids, names,
              st.sampled_from(["", "/", "%"])),
    st.lists(parts, max_size=6).map("/".join),
)


@budget()
@given(value=st.one_of(parts, st.text(max_size=100), st.integers(), st.none(), st.binary(max_size=20)))
def test_validate_id_accepts_only_the_pattern(value):
    TRIED["ids.validate_id"] += 1
    try:
        result = validate_id(value, "user_id")
    except InvalidIdError as err:
        # The message never echoes the raw value (it may be a log-injection attempt).
        assert str(err) == f"user_id must match {ID_PATTERN.pattern}"
        return
    assert result == value and ID_PATTERN.fullmatch(result)
    assert "/" not in result and ".." not in result and result.isascii()


@budget()
@given(key=upload_keys, url_encoded=st.booleans())
def test_parse_upload_key_stays_inside_its_prefix(key, url_encoded):
    TRIED["keys.parse_upload_key"] += 1
    try:
        parsed = keys.parse_upload_key(key, url_encoded=url_encoded)
    except InvalidKeyError:
        outcome("keys.parse_upload_key", "rejected")
        return
    outcome("keys.parse_upload_key", "accepted")
    assert ID_PATTERN.fullmatch(parsed.user_id) and ID_PATTERN.fullmatch(parsed.batch_id)
    assert parsed.name not in ("", ".", "..") and "/" not in parsed.name and "\\" not in parsed.name
    prefix = keys.upload_prefix(parsed.user_id, parsed.batch_id)
    rebuilt = prefix + parsed.name
    assert posixpath.normpath(rebuilt).startswith(prefix)
    assert posixpath.dirname(rebuilt) + "/" == prefix


BUILDERS = {
    "upload_prefix": (lambda a, b: keys.upload_prefix(a, b), keys.UPLOADS),
    "dataset_prefix": (lambda a, b: keys.dataset_prefix(a, b), keys.DATASETS),
    "crop_key": (lambda a, b: keys.crop_key(a, b, 7), keys.DATASETS),
    "manifest_key": (lambda a, b: keys.manifest_key(a, b), keys.DATASETS),
    "model_prefix": (lambda a, b: keys.model_prefix(a, b), keys.MODELS),
    "generation_prefix": (lambda a, b: keys.generation_prefix(a, b), keys.GENERATIONS),
    "result_key": (lambda a, b: keys.result_key(a, b), keys.GENERATIONS),
    "request_key": (lambda a, b: keys.request_key(b), keys.REQUESTS),
    "user_prefix": (lambda a, b: keys.user_prefix(keys.MODELS, a), keys.MODELS),
}


@budget()
@given(builder=st.sampled_from(sorted(BUILDERS)), first=parts, second=parts)
def test_key_builders_reject_or_stay_in_their_prefix(builder, first, second):
    TRIED["keys.builders"] += 1
    build, prefix = BUILDERS[builder]
    try:
        key = build(first, second)
    except (InvalidIdError, InvalidKeyError):
        return
    assert key.startswith(prefix) and posixpath.normpath(key).startswith(prefix.rstrip("/"))
    assert ".." not in key.split("/") and "\x00" not in key and key.isascii()


# --------------------------------------------------------------------------- images

MAGIC = [
    b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"\x00\x00\x00\x18ftypheic", b"\x00\x00\x00\x1cftypavif", b"GIF89a", b"BM", b"II*\x00", b"%PDF-1.4",
    b"<svg", b"\x00\x00\x01\x00",
]


@cache
def seeds() -> dict[str, bytes]:
    """Small real photos in each accepted format (HEIC through pillow-heif's encoder)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    small = photo("astronaut").resize((64, 64))
    face = photo("grace_hopper")
    face = face.resize((face.width * 300 // face.height, 300))  # the smallest size that still passes
    out = {
        "jpeg": encode(small, "JPEG"),
        "png": encode(small, "PNG"),
        "webp": encode(small, "WEBP"),
        "heic": encode(small, "HEIF", quality=50),
        "png_rgba": encode(small.convert("RGBA"), "PNG"),
        "face_jpeg": encode(face, "JPEG", quality=80),
        "face_png": encode(face, "PNG"),
        "face_webp": encode(face, "WEBP"),
        "face_heic": encode(face, "HEIF", quality=50),
    }
    return out


@st.composite
def mutated(draw, only=None):
    """A real photo with bytes flipped, a span cut or spliced in, or cut short."""
    names = sorted(seeds()) if only is None else [n for n in sorted(seeds()) if n.startswith(only)]
    data = bytearray(seeds()[draw(st.sampled_from(names))])
    # Flips (light: in the compressed data after the headers, so the decoders run on bad
    # data; heavy: anywhere), and now and then a splice, a cut or a truncation.
    light = draw(st.booleans())
    start = len(data) // 3 if light else 0
    for _ in range(draw(st.integers(0, 3 if light else 8))):
        i = draw(st.integers(start, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if light:
        return bytes(fix_png_crcs(data))
    if draw(st.integers(0, 3)) == 0:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    if draw(st.integers(0, 3)) == 0:
        i = draw(st.integers(0, len(data) - 1))
        j = draw(st.integers(i, min(len(data), i + 512)))
        del data[i:j]
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(fix_png_crcs(data) if draw(st.booleans()) else data)


def fix_png_crcs(data: bytearray) -> bytearray:
    """Recompute PNG chunk CRCs so flipped bytes reach the inflate/unfilter code instead of
    stopping at the checksum."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        data[end : end + 4] = zlib.crc32(data[pos + 4 : end]).to_bytes(4, "big")
        pos = end + 4
    return data


random_images = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGIC), st.binary(max_size=2048)),
)


def check_decode(data: bytes, target: str) -> None:
    try:
        image = faces.decode_image(data)
    except faces.PhotoRejected as err:
        assert err.reason in faces.REASONS
        outcome(target, err.reason)
        return
    outcome(target, "decoded")
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.width > 0 and image.height > 0


@budget()
@given(data=random_images)
def test_decode_random_bytes(data):
    TRIED["faces.decode_image(random)"] += 1
    check_decode(data, "faces.decode_image(random)")


@budget()
@given(data=mutated())
def test_decode_mutated_photos(data):
    TRIED["faces.decode_image(mutated)"] += 1
    check_decode(data, "faces.decode_image(mutated)")


def test_seeds_decode_before_mutation():
    for name, data in seeds().items():
        assert faces.decode_image(data).size[0] > 0, name


@budget(share=0.3)
@given(data=st.one_of(mutated(only="face"), random_images))
def test_analyze_photo_gives_a_verdict(data):
    TRIED["faces.analyze_photo"] += 1
    result = faces.analyze_photo(data)
    outcome("faces.analyze_photo", result.verdict)
    assert result.verdict == faces.OK or result.verdict in faces.REASONS
    if result.verdict == faces.OK:
        assert result.crop is not None and len(result.embedding) == faces.EMBEDDING_SIZE
    else:
        assert result.crop is None and result.embedding is None and result.message


# --------------------------------------------------------------------------- generation API


@pytest.fixture(scope="module")
def api_stack():
    """functions/api run as Lambda runs it against template.yaml's resources, as its own role
    (tests/unit_stack.py), with a READY model for alice so valid generations go all the way to
    InvokeEndpointAsync (accepted after the IAM check)."""
    with local_stack() as resources:
        put_model(resources, "alice", "v1", "READY")
        stack = UnitStack(resources, {})
        answer_invoke_endpoint_async(stack.module("api").aws().runtime)
        yield stack


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)
generation_bodies = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=600), st.just("portrait of sks person"), json_values),
        "negative_prompt": st.one_of(st.text(max_size=600), json_values),
        "num_images": st.one_of(st.integers(-5, 20), json_values),
        "steps": st.one_of(st.integers(-5, 500), json_values),
        "guidance_scale": st.one_of(st.floats(allow_nan=True, allow_infinity=True), json_values),
        "width": st.one_of(st.integers(-64, 4096), json_values),
        "height": st.one_of(st.integers(-64, 4096), json_values),
        "seed": st.one_of(st.integers(-(2**70), 2**70), json_values),
        "model_version": st.one_of(parts, json_values),
        "files": st.one_of(
            st.lists(
                st.fixed_dictionaries({}, optional={"name": names, "content_type": st.text(max_size=30)}),
                max_size=20,
            ),
            json_values,
        ),
    },
)
bodies = st.one_of(
    st.none(),
    st.text(max_size=300),
    generation_bodies.map(json.dumps),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
)
wild_paths = st.one_of(
    st.builds(
        lambda user, tail: f"/users/{user}{tail}",
        st.one_of(st.just("alice"), parts),
        st.sampled_from(["", "/", "/uploads", "/models", "/generations", "/generations/gen0001",
                         "/generations/../models", "/generations/%2F", "//x"]),
    ),
    st.text(max_size=80).map(lambda t: "/" + t),
)
GOOD_GENERATION = {"prompt": "portrait of sks person, studio light", "num_images": 1, "seed": 7}
field_values = st.one_of(json_values, st.integers(-(2**40), 2**40), st.text(max_size=600), parts)
near_good_generations = st.builds(
    lambda field, value: json.dumps({**GOOD_GENERATION, field: value}, allow_nan=True),
    st.sampled_from(["prompt", "negative_prompt", "num_images", "steps", "guidance_scale", "width",
                     "height", "seed", "model_version", "extra"]),
    field_values,
) | st.just(json.dumps(GOOD_GENERATION))
near_good_uploads = st.builds(
    lambda files: json.dumps({"files": files}),
    st.lists(st.fixed_dictionaries({"name": names, "content_type": st.sampled_from(
        ["image/jpeg", "image/png", "image/heic", "text/html", "", "image/jpeg; x=1"])}), max_size=20),
)
# (method, path, claims, body): the routes as a signed-in user calls them, fuzzed inside,
# and wild requests (any method, any path, any claims).
ROUTE_CALLS = st.one_of(
    st.tuples(st.just("POST"), st.just("/users/alice/generations"), st.just({"sub": "alice"}),
              near_good_generations | bodies),
    st.tuples(st.just("POST"), st.just("/users/alice/uploads"), st.just({"sub": "alice"}),
              near_good_uploads | bodies),
    st.tuples(st.just("GET"), st.just("/users/alice/models"), st.just({"sub": "alice"}), bodies),
    st.tuples(st.just("GET"), st.builds("/users/alice/generations/{}".format, st.just("gen0001") | parts),
              st.just({"sub": "alice"}), bodies),
    st.tuples(st.sampled_from(["DELETE", "GET"]), st.builds("/users/{}".format, st.just("bob") | parts),
              st.just({"sub": "bob"}), bodies),
)
WILD_CALLS = st.tuples(st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"]),
                       wild_paths, st.none(), bodies)
header_names = st.sampled_from(["content-type", "authorization", "origin", "x-forwarded-for", "accept",
                                "content-length", "host", "cookie"]) | st.text(min_size=1, max_size=20)
headers = st.dictionaries(header_names, st.text(max_size=80), max_size=6)
claims = st.one_of(
    st.none(),
    st.just({"sub": "alice"}),
    st.fixed_dictionaries({"sub": st.one_of(parts, json_values)}),
    json_values,
)


@budget()
@given(
    call=st.one_of(ROUTE_CALLS, ROUTE_CALLS, WILD_CALLS),
    wild_claim=claims,
    extra_headers=headers,
    base64_body=st.integers(0, 4),
)
def test_api_answers_4xx_or_2xx_never_5xx(api_stack, call, wild_claim, extra_headers, base64_body):
    TRIED["api.handler"] += 1
    method, path, claim, body = call
    claim = wild_claim if claim is None else claim
    if method == "DELETE" and isinstance(claim, dict) and claim.get("sub") == "alice":
        method = "GET"  # keep alice's model for the other examples
    event = http_event(method, path, sub=None, body=body, claims=claim if claim is not None else None)
    event["headers"].update(extra_headers)
    event["requestContext"]["http"]["method"] = method
    if base64_body == 0 and event.get("body") is not None:
        event["body"] = base64.b64encode(event["body"].encode("utf-8", "surrogatepass")).decode()
        event["isBase64Encoded"] = True
    response = api_stack.call("api", event)
    status = response["statusCode"]
    outcome("api.handler", str(status))
    assert 200 <= status < 500, f"{status}: {response.get('body')}"
    if status >= 400:
        assert body_of(response) is not None, "a 4xx must say why"
