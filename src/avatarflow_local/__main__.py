"""`python -m avatarflow_local demo|up|sample-photos ...` (see `--help`)."""

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

    runtime = LocalRuntime(
        _settings(args, port=args.port, api_port=args.api_port, users=users), on_event=on_event
    )
    runtime.start()
    info_path = Path(args.out) / "local-stack.json"
    try:
        aws, api, bucket = runtime.endpoint_url, runtime.api_url, runtime.bucket
        tokens = {u: runtime.token(u) for u in users}
        info = {
            "aws_endpoint_url": aws,
            "api_url": api,
            "bucket": bucket,
            "region": "us-east-1",
            "state_machine_arn": runtime.resources.state_machine_arn,
            "tokens": tokens,
            "mail_dir": str(runtime.mail_dir),
            "pid": os.getpid(),
        }
        info_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(info_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle, indent=1)
        user = users[0]
        q = shlex.quote
        body = json.dumps({"prompt": "portrait of sks person as an astronaut", "num_images": 4})
        print(
            f"""
avatarflow local stack is up (Ctrl-C stops it)
  AWS endpoint (S3, SQS, SNS, DynamoDB, Step Functions): {aws}
  API (API Gateway HTTP API stand-in):                    {api}
  bucket:         {bucket}
  state machine:  {runtime.resources.state_machine_arn}
  base model:     {runtime.base_model_path}
  emails:         {runtime.mail_dir}/ (.eml and .txt)
  dev tokens (signed with a key made for this run; they stop working when the stack stops):
"""
            + "".join(f"    {u}: {t}\n" for u, t in tokens.items())
            + f"""
Try it (another terminal):
  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1
  .venv/bin/python -m avatarflow_local sample-photos photos/   # or use your own 10-15 photos of one person
  echo '{{"email": "{user}@example.com"}}' > photos/request.json
  aws --endpoint-url {aws} s3 cp photos/ s3://{bucket}/uploads/{user}/batch1/ --recursive
  aws --endpoint-url {aws} stepfunctions list-executions \\
    --state-machine-arn {runtime.resources.state_machine_arn}
  TOKEN={tokens[user]}
  curl -s -H "Authorization: Bearer $TOKEN" {api}/users/{user}/models
  curl -s -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
    -X POST {api}/users/{user}/generations -d {q(body)}
  curl -s -H "Authorization: Bearer $TOKEN" {api}/users/{user}/generations/<generation_id>
""",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print(f"[{_stamp()}] stopping...", flush=True)
    finally:
        runtime.stop()
        info_path.unlink(missing_ok=True)
    print(f"[{_stamp()}] stopped", flush=True)
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
        "--user", action="append", help="print a dev token for this user id (repeatable; default: me)"
    )
    up.set_defaults(func=cmd_up)

    photos = sub.add_parser("sample-photos", help="write the demo's sample photos to a folder")
    photos.add_argument("folder")
    photos.add_argument("--count", type=int, default=10)
    photos.add_argument("--no-rejects", action="store_true", help="only the photos that pass")
    photos.set_defaults(func=cmd_sample_photos)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
