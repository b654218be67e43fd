"""The local runtime end to end: the real template resources, ASL, handlers, training
entrypoint and inference container code on 127.0.0.1, driven the way a user drives it
(S3 uploads, the HTTP API, the AWS CLI). Tiny model, few steps, 64 px."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from PIL import Image
from workflow_harness import call, wait_generation

from avatarflow import keys
from avatarflow.sample_photos import one_person_batch, photo_bytes
from avatarflow_local.local_issuer import LocalIssuer
from avatarflow_local.moderation_stand_in import ModerationStandIn
from avatarflow_local.runtime import LocalRuntime, Settings

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def jwt_claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def fetch_png(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(__import__("io").BytesIO(data))


class FirstGeneratedImageIsExplicit:
    """The Rekognition stand-in's verdict: the first generated image (64 px, the tiny model's)
    once armed carries an Explicit label; uploaded photos (larger) and the avatar pack made
    after MODEL_READY (before it is armed) carry none."""

    def __init__(self):
        self.flagged = 0
        self.armed = False

    def __call__(self, image):
        if image.size != (64, 64) or self.flagged or not self.armed:
            return []
        self.flagged += 1
        return [{"Name": "Explicit Nudity", "ParentName": "Explicit", "Confidence": 96.5, "TaxonomyLevel": 2},
                {"Name": "Explicit", "ParentName": "", "Confidence": 96.5, "TaxonomyLevel": 1}]


def test_in_process_stack_upload_to_model_ready_to_generation(tmp_path):
    """The whole path with the moderation layers on as deployed (a stand-in answers Rekognition
    and Comprehend): uploads checked, a flagged output withheld and reported, never delivered."""
    user, batch = "ada", "b1"
    first_generated = FirstGeneratedImageIsExplicit()
    judge = ModerationStandIn(image_labels=first_generated)
    settings = Settings(out_dir=tmp_path / "out", train_steps=3, progress=False, moderation=judge)
    with LocalRuntime(settings) as rt:
        s3 = rt.client("s3")
        photos = [
            *one_person_batch(8),
            ("coffee.jpg", photo_bytes("coffee")),
            ("someone_else.jpg", photo_bytes("astronaut")),
        ]
        prefix = keys.upload_prefix(user, batch)
        for name, data in photos:
            s3.put_object(Bucket=rt.bucket, Key=prefix + name, Body=data)
        s3.put_object(Bucket=rt.bucket, Key=prefix + "request.json", Body=b'{"email": "ada@example.com"}')

        desc = rt.wait_for_execution(user, batch, timeout=120)
        assert desc["status"] == "SUCCEEDED", desc
        # The state machine invoked each function's `live` alias, never the unqualified function.
        invoked = {(n, q) for n, q in rt.hook.qualified if n in ("preprocess_image", "build_dataset",
                                                                  "register_model", "notify")}
        assert invoked == {(name, "live") for name in ("preprocess_image", "build_dataset", "register_model")}

        # Objects: 8 crops (the coffee cup and the other person rejected), the adapter.
        def listed(p):
            contents = s3.list_objects_v2(Bucket=rt.bucket, Prefix=p).get("Contents", [])
            return sorted(o["Key"] for o in contents)

        assert len(listed(keys.dataset_prefix(user, batch) + "images/")) == 8
        manifest = json.loads(
            s3.get_object(Bucket=rt.bucket, Key=keys.manifest_key(user, batch))["Body"].read()
        )
        reasons = {p["name"]: p["reason"] for p in manifest["photos"] if p["reason"]}
        assert reasons == {"coffee.jpg": "no_face", "someone_else.jpg": "different_person"}
        assert listed(keys.model_prefix(user, batch)) == [
            keys.model_prefix(user, batch) + keys.ADAPTER_CONFIG,
            keys.model_prefix(user, batch) + keys.ADAPTER_WEIGHTS,
        ]
        # Row: READY in the registry table the template declares.
        ddb = boto3.resource("dynamodb", endpoint_url=rt.endpoint_url, region_name="us-east-1")
        row = ddb.Table(rt.resources.models_table).get_item(Key={"user_id": user, "version": batch})["Item"]
        assert row["status"] == "READY"
        # Email: the SNS email subscription from request.json, written out as .eml and .txt.
        deadline = time.time() + 10
        while not list(rt.mail_dir.glob("*MODEL_READY*.eml")) and time.time() < deadline:
            time.sleep(0.1)
        (eml,) = rt.mail_dir.glob("*MODEL_READY*.eml")
        text = eml.read_text()
        assert "To: ada@example.com" in text and f"POST /users/{user}/generations" in text
        assert eml.with_suffix(".txt").is_file()

        # The API over HTTP: API Gateway's auth first, then the function's own checks.
        api, token = rt.api_url, rt.token(user)
        assert call("GET", f"{api}/users/{user}/models")[0] == 401
        assert call("GET", f"{api}/users/{user}/models", token="local.forged.token")[0] == 401
        assert call("GET", f"{api}/users/{user}/models", rt.token("eve"))[0] == 403
        assert call("GET", f"{api}/nowhere", token)[0] == 404
        status, models = call("GET", f"{api}/users/{user}/models", token)
        assert status == 200 and models["latest_ready"] == batch
        first_generated.armed = True  # the pack's images (made already) passed moderation
        status, queued = call(
            "POST",
            f"{api}/users/{user}/generations",
            token,
            {"prompt": "portrait of sks person", "num_images": 2, "steps": 3, "seed": 5},
        )
        assert status == 202, queued
        assert queued["status_url"].startswith(f"{api}/users/{user}/generations/")
        done = wait_generation(api, user, token, queued["generation_id"])
        assert done["status"] == "COMPLETED", done
        # Image 0 (seed 5) was flagged: withheld, counted, never presigned.
        assert [i["seed"] for i in done["images"]] == [6]
        assert done["withheld"] == 1 and done["output_moderation"] == "rekognition"
        for image in done["images"]:
            assert fetch_png(image["url"]).size == (64, 64)
        result_key = keys.result_key(user, queued["generation_id"])
        result = json.loads(s3.get_object(Bucket=rt.bucket, Key=result_key)["Body"].read())
        flagged = result["images"][0]
        assert flagged["withheld"] is True and "key" not in flagged
        assert {lb["name"] for lb in flagged["moderation_labels"]} == {"Explicit Nudity", "Explicit"}
        assert result["withheld"] == 1 and result["output_moderation"] == "rekognition"
        # Every layer ran, each as its role: uploads (moderation + faces), the prompt, the outputs.
        called = [name for name, _ in judge.calls]
        assert called.count("rekognition:DetectFaces") >= 8
        assert called.count("comprehend:DetectToxicContent") == 1
        allowed = rt.resources.enforcer.allowed
        # The generation's 2 images and the pack's 2 (one per style, made after MODEL_READY).
        assert allowed[("avatarflow-local-InferenceRole", "rekognition:DetectModerationLabels")] == 2 + 2
        gen_row = ddb.Table(rt.resources.generations_table).get_item(
            Key={"generation_id": queued["generation_id"]}
        )["Item"]
        assert gen_row["status"] == "COMPLETED" and gen_row["output_location"].startswith(
            f"s3://{rt.bucket}/{keys.ASYNC_OUTPUT}"
        )
        assert len(listed(keys.generation_prefix(user, queued["generation_id"]))) == 2  # 1 PNG + result.json

        # The avatar pack after MODEL_READY (local: 2 styles x 1 image), made on the endpoint by the
        # same execution: MODEL_READY first, then PACK_READY with the contact sheet and links.
        states = [e["stateEnteredEventDetails"]["name"] for e in rt.history(desc["executionArn"])
                  if e["type"].endswith("StateEntered")]
        assert states.index("NotifyReady") < states.index("GenerateRound") < states.index("NotifyPack")
        deadline = time.time() + 10
        while not list(rt.mail_dir.glob("*PACK_READY*.eml")) and time.time() < deadline:
            time.sleep(0.1)
        (pack_mail,) = rt.mail_dir.glob("*PACK_READY*.eml")
        assert "To: ada@example.com" in pack_mail.read_text()
        status, listed_packs = call("GET", f"{api}/users/{user}/packs", token)
        assert status == 200 and [p["status"] for p in listed_packs["packs"]] == ["COMPLETED"]
        pack_id = listed_packs["packs"][0]["pack_id"]
        status, pack = call("GET", f"{api}/users/{user}/packs/{pack_id}", token)
        assert status == 200 and (pack["styles_done"], pack["styles_total"]) == (2, 2), pack
        assert [s["name"] for s in pack["styles"]] == ["studio-portrait", "corporate-headshot"]
        for style in pack["styles"]:
            (image,) = style["images"]
            assert fetch_png(image["url"]).size == (64, 64)
        sheet = fetch_png(pack["contact_sheet_url"])
        assert sheet.size[0] > 160 and sheet.size[1] > 2 * 160
        assert call("GET", f"{api}/users/{user}/packs/{pack_id}", rt.token("eve"))[0] == 403

        # Platform access through the front door: the JWT authorizer's rules (401; 403 for a
        # route's missing scope), then the API's caller check (403 for another user).
        admin = rt.admin_token()  # the backend client's client-credentials token (avatarflow/admin)
        assert call("GET", f"{api}/users/{user}/models", admin)[0] == 200  # admin acts for any user
        assert call("GET", f"{api}/users/{user}/usage", rt.token("eve"))[0] == 403
        no_scope = rt.issuer.client_credentials_token(scopes=("avatarflow/other",))
        assert call("GET", f"{api}/admin/users", token)[0] == 403  # a user token lacks the scope
        assert call("GET", f"{api}/admin/users", no_scope)[0] == 403
        assert call("GET", f"{api}/users/{user}/models", no_scope)[0] == 403  # its sub is the client
        other_key = LocalIssuer()  # a key that is not the issuer's, claiming the issuer and its kid
        forged = other_key.sign({**jwt_claims(admin), "exp": int(time.time()) + 600}, {"kid": rt.issuer.kid})
        other_key.server.server_close()
        expired = rt.issuer.client_credentials_token(exp=int(time.time()) - 60)
        wrong_audience = rt.issuer.client_credentials_token(client_id="notaclientofthisapi00000000")
        for bad in (forged, expired, wrong_audience, rt.issuer.access_token(user, exp=int(time.time()) - 60)):
            assert call("GET", f"{api}/admin/users", bad)[0] == 401
            assert call("GET", f"{api}/users/{user}/models", bad)[0] == 401
        # Usage: what the training stand-in (DescribeTrainingJob's BillableTimeInSeconds, as
        # createTrainingJob.sync returns it) and the inference container (result.json timings)
        # reported, as the user and the admin listing see it.
        billed = json.loads(desc["output"])["training"]["billable_seconds"]
        status, used = call("GET", f"{api}/users/{user}/usage", token)
        assert status == 200 and used["total"] == used["this_month"]
        assert used["total"]["training_seconds"] == billed >= 1 and used["total"]["trainings"] == 1
        # The avatar pack's generations (2 styles x 1 image, made after MODEL_READY) are metered too.
        pack_row = ddb.Table(rt.resources.physical["PacksTable"]["Ref"]).get_item(
            Key={"user_id": user, "pack_id": pack_id})["Item"]
        pack_results = [
            json.loads(s3.get_object(Bucket=rt.bucket, Key=keys.result_key(user, g))["Body"].read())
            for g in pack_row["generation_ids"]
        ]
        assert len(pack_results) == 2
        # The meter keeps each generation to the millisecond (usage.record_generation), so the
        # total is the sum of the rounded seconds, not the rounded sum.
        gpu_seconds = sum(round(r["timings"]["total_ms"] / 1000, 3) for r in [result, *pack_results])
        assert used["total"]["inference_seconds"] == pytest.approx(gpu_seconds, abs=1e-9)
        # Images metered: those delivered (the withheld one cost GPU time, counted in seconds);
        # the day's quota counts the 2 requested (packs are not taken from it: see docs).
        delivered = sum(1 for image in result["images"] if image["withheld"] is False)
        assert (used["total"]["images"], used["total"]["generations"]) == (delivered + 2, 1 + 2) == (3, 3)
        assert used["today"]["images"]["used"] == 2 and used["today"]["batches"]["used"] == 1
        status, listing = call("GET", f"{api}/admin/users", admin)
        assert status == 200 and {u["user_id"]: u["usage"] for u in listing["users"]}[user] == used["total"]

        # A bad model version is refused by the API; a failing invocation reaches FAILED via the error topic.
        assert (
            call(
                "POST",
                f"{api}/users/{user}/generations",
                token,
                {"prompt": "sks person", "model_version": "nope"},
            )[0]
            == 404
        )
    # Stopped: the environment is restored, nothing listens any more.
    assert "AWS_ENDPOINT_URL" not in os.environ or os.environ["AWS_ENDPOINT_URL"] != rt.endpoint_url


def test_up_server_with_the_aws_cli_and_plain_http(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(name, None)
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avatarflow_local",
            "up",
            "--port",
            "0",
            "--api-port",
            "0",
            "--issuer-port",
            "0",
            "--web-port",
            "0",
            "--out",
            str(out),
            "--user",
            "grace",
            "--steps",
            "3",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        info_path = out / "local-stack.json"
        deadline = time.time() + 60
        while not info_path.is_file():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.time() < deadline, "up did not start"
            time.sleep(0.2)
        time.sleep(0.2)
        info = json.loads(info_path.read_text())
        assert oct(info_path.stat().st_mode & 0o777) == "0o600"

        photos = tmp_path / "photos"
        photos.mkdir()
        for name, data in one_person_batch(8):
            (photos / name).write_bytes(data)
        (photos / "request.json").write_text('{"email": "grace@example.com"}')
        cli_env = dict(
            env, AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local", AWS_DEFAULT_REGION="us-east-1"
        )
        aws = [str(REPO / ".venv" / "bin" / "aws"), "--endpoint-url", info["aws_endpoint_url"]]
        done = subprocess.run(
            [*aws, "s3", "cp", str(photos), f"s3://{info['bucket']}/uploads/grace/batch1/", "--recursive"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("upload:") == 9

        api, token = info["api_url"], info["tokens"]["grace"]
        # The printed `TOKEN=$(.venv/bin/python -m avatarflow_local token grace --out ...)`.
        python = str(REPO / ".venv" / "bin" / "python")
        printed = subprocess.run(
            [python, "-m", "avatarflow_local", "token", "grace", "--out", str(out)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )
        assert printed.returncode == 0 and printed.stdout.strip() == token, printed.stderr
        assert call("GET", f"{api}/users/grace/models", info["id_tokens"]["grace"])[0] == 200
        if info["web_url"]:  # the web app (built by `make web`): same origin for the app and /api/
            with urllib.request.urlopen(info["web_url"], timeout=10) as page:
                assert b'<main id="main"' in page.read()
                assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
            assert call("GET", f"{info['web_url']}api/users/grace/models", token)[0] == 200
            assert call("GET", f"{info['web_url']}api/users/ada/models", token)[0] == 403
        deadline = time.time() + 120
        while True:
            status, models = call("GET", f"{api}/users/grace/models", token)
            assert status == 200, models
            if models["latest_ready"] == "batch1":
                break
            assert time.time() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        status, queued = call(
            "POST",
            f"{api}/users/grace/generations",
            token,
            {"prompt": "sks person smiling", "num_images": 1, "steps": 2, "seed": 1},
        )
        assert status == 202, queued
        finished = wait_generation(api, "grace", token, queued["generation_id"])
        assert finished["status"] == "COMPLETED"
        assert fetch_png(finished["images"][0]["url"]).size == (64, 64)

        listing = subprocess.run(
            [*aws, "s3", "ls", f"s3://{info['bucket']}/models/grace/batch1/"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert keys.ADAPTER_WEIGHTS in listing.stdout
        deadline = time.time() + 10
        while not list((out / "mail").glob("*MODEL_READY*grace*.eml")) and time.time() < deadline:
            time.sleep(0.2)
        assert list((out / "mail").glob("*MODEL_READY*grace*.eml"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert "stopped" in (tmp_path / "up.log").read_text()
    assert not (out / "local-stack.json").exists()
