"""The web app in a real browser against the whole local stack (LocalRuntime, IAM enforced):
headless Chromium from Debian's package, driven by Playwright (no browser download), the app
built from web/ (`make web`), axe-core from web/node_modules (the npm lock).

One user's whole journey: sign in through the issuer's authorize page (code + PKCE), the
browser's photo checks, the upload through the presigned POST forms (S3 CORS for the app's
origin), training progress until the model is ready, the pack step, a generation with its
image shown and downloaded, and "delete my data" with its confirmation, until the erasure is
done and the bucket holds nothing of the user. Every page and dialog passes axe-core with no
serious or critical violation, and the page reports no CSP violation or script error.
Screenshots: out/web/ under the test's tmp dir (docs/web-app.png is one of them, committed).
"""

import re
import shutil
import time
from pathlib import Path

import pytest

from avatarflow_local.demo import default_photos
from avatarflow_local.runtime import LocalRuntime, Settings

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DIST = REPO / "web" / "dist"
AXE = REPO / "web" / "node_modules" / "axe-core" / "axe.min.js"
USER = "webuser"
PHONE = {"width": 390, "height": 844}  # a phone's viewport: the app must work there


def deployed(runtime, method: str, path: str) -> bool:
    """Whether the template has this route (issues 17 and 18 add theirs): the test holds the
    page to the route's view where it exists, and to the page's fallback where it does not."""
    return any((r.method, r.path) == (method, path) for r in runtime.resources.http_routes)


def axe_violations(page) -> list[dict]:
    """axe-core's serious and critical violations on the page as it is now. axe is evaluated
    through the DevTools protocol, so the page's CSP (script-src 'self') stays on."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text() + "\n;undefined")
    found = page.evaluate("""async () => {
        const result = await axe.run(document, {resultTypes: ["violations"]});
        return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 3).map(n => n.target.join(" "))}));
    }""")
    return [v for v in found if v["impact"] in ("serious", "critical")]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Chromium is not installed (`make test` installs Debian's chromium package)")
    assert (DIST / "index.html").is_file(), "the web app is not built: `make web`"
    assert AXE.is_file(), "axe-core is not installed: `make web` (npm ci in web/)"
    out = tmp_path_factory.mktemp("web") / "out"
    settings = Settings(out_dir=out, train_steps=3, web_dist=DIST, web_poll_ms=300)
    with LocalRuntime(settings) as rt:
        yield rt


def test_a_user_signs_in_uploads_trains_generates_downloads_and_deletes(runtime, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(runtime.settings.out_dir) / "web"
    shots.mkdir(parents=True, exist_ok=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, data in default_photos(10):
        (photos / name).write_bytes(data)
    chosen = sorted(photos.iterdir())
    assert len(chosen) == 12  # 10 of one person, a photo without a face, another person

    problems, refused, checked = [], [], {}
    batches = deployed(runtime, "GET", "/users/{user_id}/batches/{batch_id}")
    packs = deployed(runtime, "GET", "/users/{user_id}/packs")

    def accessible(page, name):
        checked[name] = axe_violations(page)
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport=PHONE, accept_downloads=True)
        page = context.new_page()
        # Failed requests are judged by their URL below; any other console error is a problem.
        page.on("console", lambda m: problems.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        page.on("response", lambda r: refused.append((r.status, r.url)) if r.status >= 400 else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.set_default_timeout(20_000)

        # Signed out -> the issuer's sign-in page -> back, signed in (code + PKCE).
        page.goto(runtime.web_url + "/")
        expect(page.get_by_role("heading", name="Your personal avatars")).to_be_visible()
        accessible(page, "1-signed-out")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r"/oauth2/authorize\?"))
        assert "code_challenge_method=S256" in page.url
        accessible(page, "2-sign-in")
        page.get_by_label("User id").fill(USER)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Your avatars", exact=True)).to_be_visible()
        assert "code=" not in page.url  # the code is dropped from the address bar
        expect(page.locator("#who")).to_contain_text(f"{USER}@example.com")

        # The browser's checks: too few photos, then a file that is not a photo.
        upload = page.get_by_role("button", name="Upload and start training")
        page.get_by_label(re.compile("Photos of your face")).set_input_files([str(p) for p in chosen[:3]])
        expect(page.locator("#photo-problem")).to_contain_text("Choose at least 10 photos (you chose 3)")
        expect(upload).to_be_disabled()
        notes = tmp_path / "notes.txt"
        notes.write_text("not a photo")
        page.get_by_label(re.compile("Photos of your face")).set_input_files(
            [str(p) for p in chosen[:10]] + [str(notes)])
        expect(page.locator("#photo-list")).to_contain_text(
            "notes.txt: refused, not a JPEG, PNG, WebP or HEIC")
        expect(upload).to_be_disabled()
        accessible(page, "3-photo-checks")

        # The real set: 12 photos through the presigned forms.
        page.get_by_label(re.compile("Photos of your face")).set_input_files([str(p) for p in chosen])
        expect(page.locator("#photo-problem")).to_have_text("")
        upload.click()
        expect(page.locator("#upload-status")).to_contain_text("All 12 photos uploaded", timeout=30_000)
        s3 = runtime.client("s3")
        uploaded = s3.list_objects_v2(Bucket=runtime.bucket, Prefix=f"uploads/{USER}/").get("Contents", [])
        assert len(uploaded) == 13  # the photos and request.json (the email from the id token)

        # Progress until the model is ready; every state the page showed is kept.
        seen = []
        status = page.locator("#training-status")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            text = status.text_content() or ""
            if not seen or seen[-1] != text:
                seen.append(text)
            if text.startswith(("Your model is ready", "Training failed", "Not enough")):
                break
            time.sleep(0.2)
        assert seen[-1].startswith("Your model is ready"), seen
        assert len(seen) >= 2, seen  # something was shown while it ran
        if batches:  # each photo's verdict, as the workflow decided it
            rows = page.locator("#verdicts tbody tr")
            expect(rows).to_have_count(12)
            expect(page.locator("#verdicts tr.accepted")).to_have_count(10)
            expect(page.locator("#verdicts tr.rejected")).to_have_count(2)
            expect(page.locator("#verdicts tr.rejected", has_text="no_face_coffee.jpg")).to_be_visible()
        else:
            assert any("per-photo verdicts are not available" in text for text in seen), seen
        accessible(page, "4-trained")

        if packs:  # the pack as a gallery with identity scores
            make_pack = page.get_by_role("button", name="Make my avatar pack")
            expect(make_pack).to_be_enabled()
            make_pack.click()
            expect(page.locator("#pack-status")).to_contain_text("Your pack:", timeout=180_000)
            # Once, under the full suite's load, the images showed but no caption was found within
            # the default 5 s (the gallery is re-rendered on each poll; the cause was not pinned
            # down): wait as long as for the status.
            expect(page.locator("#pack-gallery img").first).to_be_visible(timeout=60_000)
            expect(page.locator("#pack-gallery figcaption").first).to_contain_text("Likeness to you:",
                                                                                  timeout=60_000)
            accessible(page, "4b-pack")
        else:
            expect(page.locator("#pack-status")).to_have_text(
                "Avatar packs are not available on this server yet.")

        # Generate one image, see it, download it.
        generate = page.get_by_role("button", name="Generate")
        expect(generate).to_be_enabled()
        page.get_by_label("Number of images").select_option("1")
        generate.click()
        expect(page.locator("#generate-status")).to_have_text("Done: 1 images.", timeout=120_000)
        image = page.get_by_role("img", name="Generated, image 1")
        expect(image).to_be_visible()
        page.wait_for_function("() => document.querySelector('#generate-results img').naturalWidth > 0")
        accessible(page, "5-generated")
        shutil.copy(shots / "5-generated.png", shots / "web-app.png")
        with page.expect_download() as downloading:
            page.get_by_role("button", name="Download Generated image 1").click()
        saved = tmp_path / "download.png"
        downloading.value.save_as(saved)
        assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        expect(page.locator("#generate-download-status")).to_have_text("Downloaded generated-1.png.")

        # Delete my data: a dialog that needs the word typed, then the erasure until done.
        page.get_by_role("button", name="Delete my data…").click()
        dialog = page.get_by_role("dialog", name="Delete all your data?")
        expect(dialog).to_be_visible()
        confirm = dialog.get_by_role("button", name="Delete everything")
        expect(confirm).to_be_disabled()
        accessible(page, "6-delete-dialog")
        dialog.get_by_label("Confirmation").fill("DELETE")
        confirm.click()
        expect(page.locator("#delete-status")).to_have_text(
            "All your photos, models and images are deleted.", timeout=120_000)
        accessible(page, "7-deleted")
        versions = s3.list_object_versions(Bucket=runtime.bucket)
        left = [v["Key"] for kind in ("Versions", "DeleteMarkers") for v in versions.get(kind, [])
                if f"/{USER}/" in v["Key"] or v["Key"].startswith(f"{USER}/")]
        assert left == []
        browser.close()

    assert {name: v for name, v in checked.items() if v} == {}
    assert set(checked) == {"1-signed-out", "2-sign-in", "3-photo-checks", "4-trained", "5-generated",
                            "6-delete-dialog", "7-deleted"} | ({"4b-pack"} if packs else set())
    assert problems == []  # no script error, no CSP violation
    # The only refused requests: 404 for a route this template lacks (API Gateway's), which the
    # page falls back from, and the batch view's 404 in the moments before the workflow has
    # seen the upload (the page says "waiting for the first check").
    absent = [name for name, present in (("batches", batches), ("packs", packs)) if not present]
    routes = "|".join(absent + ["batches/[0-9a-f]+"])
    missing = re.compile(rf"^{re.escape(runtime.web_url)}/api/users/{USER}/({routes})(/[^/]+)?$")
    assert [(status, url) for status, url in refused if not (status == 404 and missing.match(url))] == []
