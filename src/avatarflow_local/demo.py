"""`make demo`: photos -> the real state machine -> a trained adapter -> avatars, on 127.0.0.1.

Everything goes through the same doors a user would use: photos are PUT into the bucket
(S3 -> SQS -> on_upload -> StartExecution), the model is READY when the registry says so
and the email arrives, and the avatars are asked for over HTTP through the local API.
Outputs land in out/ (see README "What the demo produces").
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from avatarflow import keys
from avatarflow_local import training_job
from avatarflow_local.runtime import LocalRuntime, Settings

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif")
DEFAULT_PROMPT = "portrait of sks person as an astronaut, studio light"
DEFAULT_NOTE = (
    "Sample photos: the installed packages ship one portrait per person, so the default batch is "
    "{n} variants of ONE portrait (matplotlib's grace_hopper: tilted, mirrored, re-framed, re-lit), "
    "plus 2 photos that must be rejected: a coffee cup (no face) and another person (scikit-image's "
    "astronaut). MinImages is the template's {min_images}. Use PHOTOS=<folder> for your own photos."
)
OUTPUT_DIRS = ("photos", "crops", "rejected", "adapter", "avatars", "pack", "mail")


def default_photos(n: int = 10) -> list[tuple[str, bytes]]:
    from avatarflow.sample_photos import one_person_batch, photo_bytes

    return [
        *one_person_batch(n),
        ("no_face_coffee.jpg", photo_bytes("coffee")),
        ("other_person_astronaut.jpg", photo_bytes("astronaut")),
    ]


def folder_photos(folder: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise SystemExit(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {folder}")
    return [(re.sub(r"[^A-Za-z0-9._-]", "_", p.name), p.read_bytes()) for p in files]


def _http(
    method: str, url: str, token: str, body: dict | None = None, timeout: float = 30
) -> tuple[int, dict]:
    request = urllib.request.Request(  # noqa: S310 - the local API's own URL
        url,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - local API
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def stage_split(history: list[dict]) -> dict[str, float]:
    """Seconds per workflow stage from the execution history timestamps."""
    entered, exited = {}, {}
    for event in history:
        details = event.get("stateEnteredEventDetails") or event.get("stateExitedEventDetails")
        if not details:
            continue
        target = entered if event["type"].endswith("StateEntered") else exited
        target.setdefault(details["name"], event["timestamp"])
        if target is exited:
            exited[details["name"]] = event["timestamp"]
    start, end = history[0]["timestamp"], history[-1]["timestamp"]

    def span(a, b) -> float | None:
        return (b - a).total_seconds() if a and b else None

    split = {
        "settle (wait until uploads stop changing)": span(start, entered.get("PrepareImages")),
        "photo intake (Map: preprocess_image) + build_dataset": span(
            entered.get("PrepareImages"), exited.get("BuildDataset")
        ),
        "training job (stand-in: train subprocess)": span(entered.get("Train"), exited.get("Train")),
        "register model + notify": span(entered.get("RegisterModel"), exited.get("NotifyReady")),
        "avatar pack (plan, generate on the endpoint, review, PACK_READY)": span(
            entered.get("PackOfRun"), end if "PackOfRun" in entered else None
        ),
    }
    return {k: v for k, v in split.items() if v is not None}


class _TrainingBar:
    """tqdm bar fed by the training job's `step=N loss=...` lines."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, desc="train (LoRA steps)", unit="step", dynamic_ncols=True, file=sys.stderr
        )
        training_job.LISTENERS.append(self)

    def __call__(self, job: str, line: str) -> None:
        found = re.match(r"step=(\d+) loss=([0-9.eE+-]+)", line)
        if found:
            self.bar.n = int(found.group(1))
            self.bar.set_postfix(loss=float(found.group(2)), refresh=True)

    def close(self) -> None:
        if self in training_job.LISTENERS:
            training_job.LISTENERS.remove(self)
        self.bar.close()


def _save_prefix(s3, bucket: str, prefix: str, target: Path) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    saved = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            path = target / Path(obj["Key"]).name
            s3.download_file(bucket, obj["Key"], str(path))
            saved.append(path)
    return sorted(saved)


def _save_pack(api: str, user: str, token: str, target: Path) -> tuple[list, dict | None]:
    """The user's newest pack over HTTP (GET .../packs, then the pack): its kept images and its
    contact sheet downloaded through their presigned URLs into `target`."""
    status, listed = _http("GET", f"{api}/users/{user}/packs", token)
    if status != 200 or not listed.get("packs"):
        return [], None
    pack_id = listed["packs"][0]["pack_id"]
    status, pack = _http("GET", f"{api}/users/{user}/packs/{pack_id}", token)
    if status != 200:
        return [], None
    target.mkdir(parents=True, exist_ok=True)
    saved = []
    for style in pack["styles"]:
        for i, image in enumerate(style["images"]):
            path = target / f"{style['name']}-{i}.png"
            with urllib.request.urlopen(image["url"], timeout=30) as response:  # noqa: S310 - presigned local URL
                path.write_bytes(response.read())
            saved.append((path, style["name"], image.get("identity_similarity")))
    if pack.get("contact_sheet_url"):
        with urllib.request.urlopen(pack["contact_sheet_url"], timeout=30) as response:  # noqa: S310
            (target / "contact_sheet.png").write_bytes(response.read())
    (target / "pack.json").write_text(json.dumps(pack, indent=1))
    return saved, pack


def run_demo(
    settings: Settings,
    photos: Path | None = None,
    user: str = "demo",
    batch: str = "batch1",
    prompt: str = DEFAULT_PROMPT,
    num_images: int = 4,
    gen_steps: int = 20,
    seed: int = 42,
    email: str = "demo@example.com",
    timeout: float = 900,
) -> int:
    t_all = time.monotonic()
    out = Path(settings.out_dir)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    say = print

    files = folder_photos(photos) if photos else default_photos()
    say(f"avatarflow demo: {len(files)} photos from {photos or 'packages installed with the project'}")
    if not photos:
        say("  " + DEFAULT_NOTE.format(n=len(files) - 2, min_images=settings.min_images or 8))
    elif settings.min_images:
        say(f"  MinImages lowered to {settings.min_images} for this run.")

    t = time.monotonic()
    runtime = LocalRuntime(settings, on_event=lambda kind, text: None)
    runtime.start()
    timings["start the local stack"] = time.monotonic() - t
    say(f"  stack up: AWS endpoint {runtime.endpoint_url}, API {runtime.api_url}, bucket {runtime.bucket}")
    say(
        "  base model: "
        + (
            "tiny random SD (64 px, built from config, no download)"
            if settings.tiny
            else str(runtime.base_model_path)
        )
    )
    try:
        s3 = runtime.client("s3")
        steps = int(runtime.resources.substitutions["TrainingSteps"])

        t = time.monotonic()
        photos_dir = out / "photos"
        photos_dir.mkdir(parents=True, exist_ok=True)
        prefix = keys.upload_prefix(user, batch)
        for name, data in files:
            (photos_dir / name).write_bytes(data)
            s3.put_object(Bucket=runtime.bucket, Key=prefix + name, Body=data)
        s3.put_object(
            Bucket=runtime.bucket,
            Key=prefix + keys.REQUEST_FILE,
            Body=json.dumps({"email": email}).encode(),
            ContentType="application/json",
        )
        timings["upload photos to S3"] = time.monotonic() - t
        say(f"  uploaded {len(files)} photos + request.json to s3://{runtime.bucket}/{prefix}")

        t = time.monotonic()
        bar = _TrainingBar(steps)
        try:
            desc = runtime.wait_for_execution(user, batch, timeout=timeout)
        finally:
            bar.close()
        timings["workflow: upload -> MODEL_READY -> PACK_READY (state machine)"] = time.monotonic() - t
        history = runtime.history(desc["executionArn"])
        (out / "execution_history.json").write_text(json.dumps(history, indent=1, default=str))
        split = stage_split(history)

        manifest_path = out / "manifest.json"
        try:
            s3.download_file(runtime.bucket, keys.manifest_key(user, batch), str(manifest_path))
            manifest = json.loads(manifest_path.read_text())
        except Exception:  # noqa: BLE001 - the run may have failed before build_dataset
            manifest = {"photos": []}
        rejected = [p for p in manifest.get("photos", []) if p.get("reason")]
        if rejected:
            (out / "rejected").mkdir(exist_ok=True)
            for p in rejected:
                if (photos_dir / p["name"]).is_file():
                    shutil.copy(photos_dir / p["name"], out / "rejected" / p["name"])
            (out / "rejected" / "reasons.json").write_text(
                json.dumps([{k: p[k] for k in ("name", "reason", "message")} for p in rejected], indent=1)
            )
            (out / "rejected" / "reasons.txt").write_text(
                "".join(f"{p['name']}: {p['reason']} - {p['message']}\n" for p in rejected)
            )
        crops = _save_prefix(s3, runtime.bucket, keys.dataset_prefix(user, batch) + "images/", out / "crops")

        if desc["status"] != "SUCCEEDED":
            say(f"\nworkflow {desc['status']}: {desc.get('error')} {desc.get('cause', '')[:500]}")
            for p in rejected:
                say(f"  rejected {p['name']}: {p['reason']}")
            say(f"see {out}/execution_history.json and {out}/mail/")
            return 1

        say(
            f"  MODEL_READY: {len(crops)} crops trained {steps} steps; rejected: "
            + (", ".join(f"{p['name']} ({p['reason']})" for p in rejected) or "none")
        )
        adapter_files = _save_prefix(s3, runtime.bucket, keys.model_prefix(user, batch), out / "adapter")

        t = time.monotonic()
        token = runtime.token(user)
        api = runtime.api_url
        status, models = _http("GET", f"{api}/users/{user}/models", token)
        assert status == 200 and models["latest_ready"] == batch, (status, models)
        size = int(runtime.resources.substitutions["Resolution"])
        status, queued = _http(
            "POST",
            f"{api}/users/{user}/generations",
            token,
            {
                "prompt": prompt,
                "num_images": num_images,
                "steps": gen_steps,
                "seed": seed,
                "width": size,
                "height": size,
            },
        )
        if status != 202:
            say(f"generation refused: HTTP {status} {queued}")
            return 1
        deadline = time.monotonic() + timeout
        while True:
            status_url = f"{api}/users/{user}/generations/{queued['generation_id']}"
            status, generation = _http("GET", status_url, token)
            if generation.get("status") != "PENDING" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        timings["generate 4 avatars (API over HTTP -> async endpoint)"] = time.monotonic() - t
        if generation.get("status") != "COMPLETED":
            say(f"generation {generation.get('status')}: {generation}")
            return 1
        avatars_dir = out / "avatars"
        avatars_dir.mkdir(exist_ok=True)
        avatars = []
        for i, image in enumerate(generation["images"]):
            path = avatars_dir / f"{i:03d}.png"
            with urllib.request.urlopen(image["url"], timeout=30) as response:  # noqa: S310 - presigned local URL
                path.write_bytes(response.read())
            avatars.append((path, image.get("identity_similarity"), image.get("seed")))
        (avatars_dir / "generation.json").write_text(json.dumps(generation, indent=1))

        # The avatar pack: the same execution made it after MODEL_READY (PACK_READY email).
        t = time.monotonic()
        pack_images, pack_view = _save_pack(api, user, token, out / "pack")
        timings["fetch the avatar pack (made in the workflow above)"] = time.monotonic() - t
        if pack_view is None or pack_view.get("status") not in ("COMPLETED", "PARTIAL"):
            say(f"no avatar pack: {pack_view}")
            return 1

        t = time.monotonic()
        deadline = time.monotonic() + 10
        while len(list(runtime.mail_dir.glob("*_READY*.eml"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        mails = sorted(runtime.mail_dir.glob("*.eml"))
        from avatarflow_local.contact_sheet import contact_sheet

        sheet = contact_sheet(
            photos=[
                (photos_dir / name, next((p["reason"] for p in rejected if p["name"] == name), None))
                for name, _ in files
            ],
            crops=crops,
            avatars=avatars,
            title=(
                f"avatarflow local demo: {len(files)} photos -> {len(crops)} crops"
                f" -> {len(avatars)} avatars; avatar pack: {pack_view['styles_done']} of"
                f" {pack_view['styles_total']} styles"
            ),
            note=(
                "tiny random base model: avatars are noise by design and have no face to score; "
                "--base-model <diffusers folder> gives real avatars"
            )
            if runtime.settings.tiny
            else f"base model {runtime.base_model_path.name}, {steps} training steps",
            pack=pack_images,
        )
        sheet.save(out / "contact_sheet.png")
        timings["write outputs (crops, adapter, emails, contact sheet)"] = time.monotonic() - t

        total = time.monotonic() - t_all
        say("\nSummary")
        for name, seconds in timings.items():
            say(f"  {seconds:7.1f} s  {name}")
            if name.startswith("workflow"):
                for sub, sub_s in split.items():
                    say(f"  {'':7}    {sub_s:6.1f} s  {sub}")
        say(f"  {total:7.1f} s  total")
        say(f"\nOutputs in {out}/:")
        say(
            f"  crops/ ({len(crops)})  rejected/ ({len(rejected)}, reasons.txt)  adapter/ "
            f"({', '.join(p.name for p in adapter_files)})"
        )
        say(
            f"  avatars/ ({len(avatars)} PNG, identity: "
            + ", ".join("n/a" if s is None else f"{s:.2f}" for _, s, _ in avatars)
            + ")"
        )
        say(f"  pack/ ({pack_view['styles_done']} of {pack_view['styles_total']} styles: "
            + ", ".join(s["name"] for s in pack_view["styles"]) + "; contact_sheet.png, pack.json)")
        say(f"  mail/ ({', '.join(p.name for p in mails) or 'none'})")
        say("  execution_history.json  manifest.json  contact_sheet.png")
        (out / "summary.json").write_text(
            json.dumps(
                {
                    "total_s": round(total, 2),
                    "stages_s": {k: round(v, 2) for k, v in timings.items()},
                    "workflow_split_s": {k: round(v, 2) for k, v in split.items()},
                    "startup_s": {k: round(v, 2) for k, v in runtime.timer.stages.items()},
                    "photos": len(files),
                    "crops": len(crops),
                    "rejected": {p["name"]: p["reason"] for p in rejected},
                    "training_steps": steps,
                    "avatars": len(avatars),
                    "pack": {"pack_id": pack_view["pack_id"], "status": pack_view["status"],
                             "styles": [s["name"] for s in pack_view["styles"]]},
                    "emails": [p.name for p in mails],
                },
                indent=1,
            )
        )
        return 0
    finally:
        runtime.stop()
