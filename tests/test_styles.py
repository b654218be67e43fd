"""The pack style catalogue (src/avatarflow/styles.py, styles.json): schema and moderation when
loaded, the operator's own styles from config/styles.json, and the pack's unit behaviour through
the pack function and the API as Lambda runs them (tests/unit_stack.py; IAM enforced)."""

import json

import boto3
import pytest
import unit_stack
from apitools import body_of, http_event, put_model

from avatarflow import erasure, keys, notifications, packs, styles

module_stack, stack = unit_stack.module_stack, unit_stack.stack

PRESET = {
    "name": "pixel-art",
    "title": "Pixel art",
    "prompt": "pixel art portrait of {token} {subject_class}",
    "negative_prompt": "blurry",
    "steps": 25,
    "guidance_scale": 7.0,
    "seeds": [7, 8],
}


def catalogue(*presets) -> str:
    return json.dumps({"version": 1, "styles": list(presets)})


def test_the_defaults_are_ten_valid_presets_for_sd15_and_sdxl():
    defaults = styles.defaults()
    assert len(defaults) == 10 and len({s.name for s in defaults}) == 10
    for style in defaults:
        prompt = style.render("zwx", "woman")
        assert "zwx woman" in prompt and "{" not in prompt
        assert style.width is None and style.height is None  # the model's native size: 512 or 1024
        assert 20 <= style.steps <= 40 and len(style.seeds) >= 2


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"prompt": "a nude portrait of {token} {subject_class}"}, "moderation"),
        ({"title": "NSFW"}, "moderation"),
    ({"negative_prompt": "blurry, clothes"}, "moderation"),  # steers toward nudity
        ({"prompt": "portrait of {token}"}, "subject_class"),
        ({"prompt": "portrait of {token} {subject_class} {other}"}, "placeholders"),
        ({"steps": "30"}, "steps"),
        ({"seeds": []}, "seeds"),
        ({"width": 500}, "width"),
        ({"name": "Bad Name"}, "name"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_preset_that_breaks_the_schema_or_the_moderation_policy_is_refused(change, why):
    with pytest.raises(styles.CatalogueError) as err:
        styles.parse(catalogue({**PRESET, **change}))
    assert "pixel-art" in str(err.value) or why in str(err.value) or "styles.0" in str(err.value)


def test_the_operator_adds_and_replaces_presets_by_name():
    replaced = {**PRESET, "name": "studio-portrait", "title": "House studio"}
    merged = styles.load(catalogue(PRESET, replaced))
    names = [s.name for s in merged]
    assert names[0] == "studio-portrait" and merged[0].title == "House studio"
    assert names[-1] == "pixel-art" and len(names) == 11
    assert [s.name for s in styles.pick(merged, ["pixel-art", "watercolor"], 0)] == [
        "pixel-art",
        "watercolor",
    ]
    assert [s.name for s in styles.pick(merged, None, 2)] == names[:2]
    with pytest.raises(styles.CatalogueError, match="unknown styles: nope"):
        styles.pick(merged, ["nope"], 0)


def test_ranking_keeps_the_most_alike_and_never_a_withheld_image():
    images = [
        {"key": "a", "seed": 1, "identity_similarity": 0.2},
        {"key": "b", "seed": 2, "identity_similarity": None},
        {"key": "c", "seed": 3, "identity_similarity": 0.9, "withheld": True},
        {"key": "d", "seed": 4, "identity_similarity": 0.5},
        {"seed": 5, "withheld": True},
    ]
    assert [i["key"] for i in packs.rank(images, 3)] == ["d", "a", "b"]
    outcome = packs.style_outcome("s", [{"status": "COMPLETED", "images": images}], 1)
    assert outcome["status"] == "COMPLETED" and outcome["images"] == [images[3]]
    assert not packs.needs_regeneration(outcome, 0.36) and packs.needs_regeneration(outcome, 0.6)
    unscored = packs.style_outcome("s", [{"status": "COMPLETED", "images": [images[1]]}], 1)
    assert packs.needs_regeneration(unscored, 0.36)  # no face found: below any threshold
    failed = packs.style_outcome("s", [{"status": "FAILED", "error": "CUDA out of memory"}], 1)
    assert failed == {
        "name": "s",
        "status": "FAILED",
        "images": [],
        "generated": 0,
        "error": "CUDA out of memory",
    }
    assert not packs.needs_regeneration(failed, 0.36)
    assert packs.pack_status([outcome, failed]) == packs.PARTIAL


def test_the_pack_email_names_failed_styles_and_the_route_for_fresh_links():
    ok = {"name": "oil-painting", "status": "COMPLETED", "images": [{"key": "k"}]}
    bad = {"name": "watercolor", "status": "FAILED", "images": [], "error": "CUDA out of memory"}
    text = notifications.pack_ready(
        "ada",
        "p1",
        [ok, bad],
        {"oil-painting": "Oil painting"},
        "https://sheet",
        {"oil-painting": ["https://img1"]},
        3600,
    )
    assert text["event"] == "PACK_READY" and len(text["subject"]) < 100
    body = text["message"]
    assert "1 of 2 styles" in body and "https://sheet" in body and "https://img1" in body
    assert "watercolor (watercolor)" in body and "CUDA" not in body  # no raw cause
    assert "1 hour" in body and "GET /users/ada/packs/p1" in body


# --------------------------------------------------------------------------- through Lambda, IAM enforced
def plan_event(**extra):
    return {
        "action": "plan",
        "user_id": "ada",
        "version": "v1",
        "pack": {"origin": "training"},
        "styles_count": 2,
        "images_per_style": 4,
        "keep_per_style": 2,
        "execution_arn": "arn:aws:states:us-east-1:123456789012:execution:m:ada-v1",
        **extra,
    }


def test_a_training_runs_pack_is_planned_once_and_zero_styles_turn_it_off(stack):
    first = stack.call("pack", plan_event())
    again = stack.call("pack", plan_event())  # a retried task
    assert first["enabled"] and first["pack_id"] == again["pack_id"] == packs.pack_id_for(
        plan_event()["execution_arn"]
    )
    table = boto3.resource("dynamodb").Table(stack.resources.physical["PacksTable"]["Ref"])
    (row,) = table.scan()["Items"]
    assert row["styles"] == ["studio-portrait", "corporate-headshot"] and row["status"] == packs.RUNNING
    assert stack.call("pack", plan_event(styles_count=0)) == {
        "enabled": False,
        "erased": False,
        "pack_id": None,
    }


def test_the_operators_styles_object_is_read_and_validated(stack):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=stack.resources.bucket, Key=keys.STYLES_OBJECT, Body=catalogue(PRESET).encode())
    answer = stack.call("pack", plan_event(styles_count=11))
    table = boto3.resource("dynamodb").Table(stack.resources.physical["PacksTable"]["Ref"])
    row = table.get_item(Key={"user_id": "ada", "pack_id": answer["pack_id"]})["Item"]
    assert row["styles"][-1] == "pixel-art" and len(row["styles"]) == 11
    s3.put_object(
        Bucket=stack.resources.bucket,
        Key=keys.STYLES_OBJECT,
        Body=catalogue({**PRESET, "prompt": "naked {token} {subject_class}"}).encode(),
    )
    with pytest.raises(styles.CatalogueError, match="moderation"):
        stack.call("pack", plan_event(execution_arn="arn:aws:states:us-east-1:123456789012:execution:m:x"))


def test_pack_routes_check_the_caller_the_styles_and_the_model(stack):
    call = lambda method, path, sub="ada", body=None: stack.call(  # noqa: E731
        "api", http_event(method, path, sub=sub, body=body)
    )
    assert call("POST", "/users/ada/packs")["statusCode"] == 409  # no READY model yet
    put_model(stack.resources, "ada", "v1", "READY")
    bad = call("POST", "/users/ada/packs", body={"styles": ["nope"]})
    assert bad["statusCode"] == 400 and body_of(bad)["errors"][0]["field"] == "body.styles"
    assert (
        call("POST", "/users/ada/packs", body={"styles": ["watercolor", "watercolor"]})["statusCode"] == 400
    )
    assert call("POST", "/users/ada/packs", sub="eve")["statusCode"] == 403
    queued = call("POST", "/users/ada/packs", body={"styles": ["watercolor", "comic-book"]})
    assert queued["statusCode"] == 202
    pack = body_of(queued)
    assert pack["styles_total"] == 2 and pack["status"] == "PENDING"
    sfn = boto3.client("stepfunctions")
    (execution,) = sfn.list_executions(stateMachineArn=stack.resources.state_machine_arn)["executions"]
    started = json.loads(sfn.describe_execution(executionArn=execution["executionArn"])["input"])
    assert started == {"user_id": "ada", "version": "v1", "pack": {"pack_id": pack["pack_id"]}}
    view = body_of(call("GET", f"/users/ada/packs/{pack['pack_id']}"))
    assert view["status"] == "PENDING" and (view["styles_done"], view["styles_total"]) == (0, 2)
    assert [s["status"] for s in view["styles"]] == ["PENDING", "PENDING"]
    assert call("GET", "/users/ada/packs/not-a-pack")["statusCode"] == 404
    assert call("GET", "/users/ada/packs/bad%id")["statusCode"] == 400
    assert body_of(call("GET", "/users/eve/packs", sub="eve")) == {"packs": []}
    erasures = boto3.resource("dynamodb").Table(
        stack.resources.function_specs["api"].environment["ERASURES_TABLE"]
    )
    erasure.request(erasures, "ada", erasure.Timing())
    assert call("POST", "/users/ada/packs")["statusCode"] == 410
