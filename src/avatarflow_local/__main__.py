"""`python -m avatarflow_local demo|up|token|sample-photos ...` (see `--help`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from avatarflow_local.runtime import Settings


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="a diffusers folder (SD 1.5 / 2.1 / SDXL) for real avatars; default: the tiny "
        "random model (built once under .cache/, no download). The GPU is used when present.",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (tiny: 40, real model: 400)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="crop/training size (tiny: 64, real: 512)"
    )
    parser.add_argument(
        "--min-images",
        type=int,
        default=None,
        help="accepted photos needed to train (default: the template's MinImages, 8)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the functions' JSON logs and metrics")


def _settings(args, **extra) -> Settings:
    return Settings(
        out_dir=args.out,
        base_model=args.base_model,
        train_steps=args.steps,
        resolution=args.resolution,
        min_images=args.min_images,
        verbose=args.verbose,
        **extra,
    )


def cmd_demo(args) -> int:
    from avatarflow_local.demo import run_demo

    photos = args.photos or (Path(os.environ["PHOTOS"]) if os.environ.get("PHOTOS") else None)
    return run_demo(
        _settings(args, progress=True),
        photos=photos,
        prompt=args.prompt,
        num_images=args.num_images,
        gen_steps=args.gen_steps,
    )


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def _write_info(path: Path, info: dict) -> None:
    """out/local-stack.json, readable by this user only (it holds bearer tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle, indent=1)


def _mint(runtime, users: tuple[str, ...]) -> dict:
    """Fresh access and id tokens for every user, and when the access tokens expire."""
    return {
        "tokens": {u: runtime.token(u) for u in users},
        "id_tokens": {u: runtime.issuer.id_token(u) for u in users},
        "admin_token": runtime.admin_token(),
        "tokens_expire": time.strftime("%H:%M:%S", time.localtime(time.time() + runtime.issuer.access_ttl_s)),
    }


def cmd_up(args) -> int:
    from avatarflow_local.runtime import LocalRuntime

    users = tuple(args.user or ["me"])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def on_event(kind: str, text: str) -> None:
        step = re.search(r"step=(\d+)", text) if kind == "train" else None
        if step is None or int(step.group(1)) == 1 or int(step.group(1)) % 10 == 0:
            print(f"[{_stamp()}] {kind}: {text}", flush=True)

    from avatarflow_local.functions import REPO_ROOT

    web_dist = REPO_ROOT / "web" / "dist"
    if not (web_dist / "index.html").is_file():
        print(f"no web app in {web_dist} (`make web` builds it): serving the API only", flush=True)
        web_dist = None
    runtime = LocalRuntime(
        _settings(args, port=args.port, api_port=args.api_port, issuer_port=args.issuer_port, users=users,
                  web_dist=web_dist, web_port=args.web_port),
        on_event=on_event,
    )
    runtime.start()
    info_path = Path(args.out) / "local-stack.json"
    try:
        aws, api, bucket, issuer = runtime.endpoint_url, runtime.api_url, runtime.bucket, runtime.issuer
        web = runtime.web_url + "/" if runtime.web else None
        info = {
            "web_url": web,
            "aws_endpoint_url": aws,
            "api_url": api,
            "bucket": bucket,
            "region": "us-east-1",
            "state_machine_arn": runtime.resources.state_machine_arn,
            "issuer": issuer.issuer,
            "client_id": issuer.client_id,
            "backend_client_id": issuer.backend_client_id,
            "mail_dir": str(runtime.mail_dir),
            "pid": os.getpid(),
            **_mint(runtime, users),
        }
        _write_info(info_path, info)
        user = users[0]
        q = shlex.quote
        body = json.dumps({"prompt": "portrait of sks person as an astronaut", "num_images": 4})
        out_arg = "" if Path(args.out) == Path("out") else f" --out {q(str(args.out))}"
        ttl_min = issuer.access_ttl_s // 60
        print(
            f"""
avatarflow local stack is up (Ctrl-C stops it)
  web app (open it in a browser; sign in with any user id):  {web or "not built (make web)"}
  AWS endpoint (S3, SQS, SNS, DynamoDB, Step Functions): {aws}
  API (API Gateway HTTP API stand-in):                    {api}
  JWT issuer (stands in for the Cognito user pool):       {issuer.issuer}
  app client id (the JWT authorizer's audience):          {issuer.client_id}
  backend client id (client credentials, avatarflow/admin): {issuer.backend_client_id}
  bucket:         {bucket}
  state machine:  {runtime.resources.state_machine_arn}
  base model:     {runtime.base_model_path}
  emails:         {runtime.mail_dir}/ (.eml and .txt)
  access tokens (RS256 JWTs like Cognito's, signed with a key made for this run: they stop
  working when the stack stops; valid {ttl_min} min, renewed in {info_path} every {ttl_min // 2} min):
"""
            + "".join(f"    {u}: {t}\n" for u, t in info["tokens"].items())
            + f"""
Try it (another terminal, in this folder):
  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1
  .venv/bin/python -m avatarflow_local sample-photos photos/   # or use your own 10-15 photos of one person
  echo '{{"email": "{user}@example.com"}}' > photos/request.json
  .venv/bin/aws --endpoint-url {aws} s3 cp photos/ s3://{bucket}/uploads/{user}/batch1/ --recursive
  .venv/bin/aws --endpoint-url {aws} stepfunctions list-executions \\
    --state-machine-arn {runtime.resources.state_machine_arn}
  TOKEN=$(.venv/bin/python -m avatarflow_local token {user}{out_arg})  # current access token (--id: id token)
  curl -s -H "Authorization: Bearer $TOKEN" {api}/users/{user}/models
  curl -s -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
    -X POST {api}/users/{user}/generations -d {q(body)}
  curl -s -H "Authorization: Bearer $TOKEN" {api}/users/{user}/generations/<generation_id>
  curl -s -H "Authorization: Bearer $TOKEN" {api}/users/{user}/usage   # quotas today, metered usage
  ADMIN=$(.venv/bin/python -m avatarflow_local token --admin{out_arg})  # backend's client-credentials token
  curl -s -H "Authorization: Bearer $ADMIN" {api}/admin/users           # every user with a usage line
  curl -s {issuer.issuer}/.well-known/openid-configuration   # the issuer's discovery document (and JWKS)
""",
            flush=True,
        )
        renew_at = time.monotonic() + issuer.access_ttl_s / 2
        while not stop.wait(0.5):
            if time.monotonic() >= renew_at:
                info.update(_mint(runtime, users))
                _write_info(info_path, info)
                renew_at = time.monotonic() + issuer.access_ttl_s / 2
                print(f"[{_stamp()}] tokens renewed in {info_path} (valid until {info['tokens_expire']})",
                      flush=True)
        print(f"[{_stamp()}] stopping...", flush=True)
    finally:
        runtime.stop()
        info_path.unlink(missing_ok=True)
    print(f"[{_stamp()}] stopped", flush=True)
    return 0


def cmd_token(args) -> int:
    """Prints a user's current token (or, with --admin, the backend client's) from a running
    `up` (its out/local-stack.json)."""
    info_path = Path(args.out) / "local-stack.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        print(f"no {info_path}: is `make up` running (with this --out)?", file=sys.stderr)
        return 1
    if args.admin:
        print(info["admin_token"])
        return 0
    tokens = info["id_tokens" if args.id else "tokens"]
    if args.user not in tokens:
        print(f"no token for {args.user!r}: `up` was started for {sorted(tokens)} (--user)", file=sys.stderr)
        return 1
    print(tokens[args.user])
    return 0


def cmd_sample_photos(args) -> int:
    from avatarflow_local.demo import default_photos

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = default_photos(args.count)
    if args.no_rejects:
        files = files[:-2]
    for name, data in files:
        (folder / name).write_bytes(data)
    print(
        f"wrote {len(files)} photos to {folder}/ (variants of one portrait"
        + ("" if args.no_rejects else ", plus a no-face photo and another person")
        + ")"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avatarflow_local", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="photos -> trained model -> 4 avatars, outputs in out/")
    _common(demo)
    demo.add_argument(
        "--photos",
        type=Path,
        default=None,
        help="a folder of photos (default: $PHOTOS, else sample photos from installed packages)",
    )
    demo.add_argument("--prompt", default="portrait of sks person as an astronaut, studio light")
    demo.add_argument("--num-images", type=int, default=4)
    demo.add_argument("--gen-steps", type=int, default=20, help="denoising steps per image")
    demo.set_defaults(func=cmd_demo)

    up = sub.add_parser("up", help="a long-running local stack for the AWS CLI, boto3 and curl")
    _common(up)
    up.add_argument("--port", type=int, default=4566, help="AWS endpoint port (0: any free port)")
    up.add_argument("--api-port", type=int, default=4567, help="API port (0: any free port)")
    up.add_argument(
        "--issuer-port", type=int, default=4568, help="local JWT issuer port (JWKS; 0: any free port)"
    )
    up.add_argument("--web-port", type=int, default=4569, help="web app port (0: any free port)")
    up.add_argument(
        "--user", action="append", help="mint tokens for this user id (repeatable; default: me)"
    )
    up.set_defaults(func=cmd_up)

    token = sub.add_parser("token", help="print a user's current token from a running `up`")
    token.add_argument("user", nargs="?", default="me")
    token.add_argument("--id", action="store_true", help="the id token instead of the access token")
    token.add_argument("--admin", action="store_true",
                       help="the backend client's client-credentials token (scope avatarflow/admin)")
    token.add_argument("--out", type=Path, default=Path("out"), help="`up`'s output folder (default: out)")
    token.set_defaults(func=cmd_token)

    photos = sub.add_parser("sample-photos", help="write the demo's sample photos to a folder")
    photos.add_argument("folder")
    photos.add_argument("--count", type=int, default=10)
    photos.add_argument("--no-rejects", action="store_true", help="only the photos that pass")
    photos.set_defaults(func=cmd_sample_photos)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
