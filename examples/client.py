"""Submit a job to the worker, follow its progress and save the images or the video it returns.

    RUNPOD_API_KEY=... python examples/client.py --endpoint ENDPOINT_ID --input job.json --out outputs/
    python examples/client.py --local http://localhost:8000 --input job.json --out outputs/

job.json holds the job's input, alone or as {"input": {...}} (test_input.json works). The job goes to
/run through the runpod SDK's `Endpoint`; /status is polled every few seconds, printing the worker's
progress ({"phase", "step", "total"}); the MP4 or PNGs are written to OUT/<job id>/, decoded from
base64 data URIs or downloaded when the worker returned bucket URLs.

--local talks to `python handler.py --rp_serve_api --rp_api_port 8000`. Its routes differ from RunPod's
in two ways: no endpoint id in the path (/run, not /ENDPOINT_ID/run), and /status is a POST that runs
the queued job and answers when it is done, so a local job shows no progress.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import requests
import runpod

POLL_S = 2.0
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


def submit(endpoint: runpod.Endpoint, job_input: dict, local: bool) -> str:
    if local:
        return endpoint.rp_client.post("run", {"input": job_input})["id"]
    return endpoint.run({"input": job_input}).job_id


def status(endpoint: runpod.Endpoint, job_id: str, local: bool) -> dict:
    if local:  # runs the job: waits as long as it takes
        return endpoint.rp_client.post(f"status/{job_id}", None, timeout=24 * 3600)
    return endpoint.rp_client.get(f"{endpoint.endpoint_id}/status/{job_id}", timeout=30)


def wait(endpoint: runpod.Endpoint, job_id: str, local: bool) -> dict:
    """Poll until the job ends, printing each new status and progress step."""
    shown = ""
    while True:
        state = status(endpoint, job_id, local)
        progress = state.get("output") if state["status"] == "IN_PROGRESS" else None
        line = state["status"] + (f": {progress['phase']} step {progress['step']}/{progress['total']}"
                                  if isinstance(progress, dict) and "step" in progress else "")
        if line != shown:
            print(line, flush=True)
            shown = line
        if state["status"] in FINAL:
            return state
        time.sleep(POLL_S)


def _extension(uri: str) -> str:
    """An image's file extension from its data URI (a result shrunk to fit comes back as JPEG) or its URL."""
    mime = uri[5:].split(";", 1)[0] if uri.startswith("data:") else ""
    return {"image/jpeg": "jpg", "image/webp": "webp"}.get(mime) or (
        "jpg" if uri.split("?", 1)[0].lower().endswith((".jpg", ".jpeg")) else "png")


def save(output: dict, folder: Path) -> list[Path]:
    """Write the job's video or images to `folder`; returns their paths."""
    results = ([("video.mp4", output["video"])] if "video" in output else
               [(f"image-{i}.{_extension(uri)}", uri) for i, uri in enumerate(output["images"])])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, value in results:
        path = folder / name
        if value.startswith("data:"):
            path.write_bytes(base64.b64decode(value.split(",", 1)[1]))
        else:  # a presigned bucket URL: stream it to disk (videos can be large)
            with requests.get(value, stream=True, timeout=60) as response, open(path, "wb") as file:
                response.raise_for_status()
                for chunk in response.iter_content(1 << 20):
                    file.write(chunk)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", help="RunPod endpoint id (the API key comes from RUNPOD_API_KEY)")
    parser.add_argument("--local", metavar="URL", help="the local API instead, e.g. http://localhost:8000")
    parser.add_argument("--input", required=True, type=Path, help="JSON file with the job's input")
    parser.add_argument("--out", default=Path("outputs"), type=Path, help="folder for the results (default outputs)")
    args = parser.parse_args(argv)
    api_key = os.environ.get("RUNPOD_API_KEY") or ("local" if args.local else None)  # the local API needs none
    if not (args.local or args.endpoint) or not api_key:
        parser.error("give --endpoint with RUNPOD_API_KEY set, or --local URL")
    if args.local:
        runpod.endpoint_url_base = args.local.rstrip("/")  # read when the Endpoint's client is made
    job_input = json.loads(args.input.read_text())
    job_input = job_input.get("input", job_input)

    endpoint = runpod.Endpoint(args.endpoint or "local", api_key=api_key)
    job_id = submit(endpoint, job_input, bool(args.local))
    print(f"job {job_id} submitted", flush=True)
    state = wait(endpoint, job_id, bool(args.local))
    if state["status"] != "COMPLETED":
        print(f"job {job_id} {state['status']}: {state.get('error', '')}", file=sys.stderr)
        return 1
    output = state["output"]
    for warning in output.get("warnings", []):
        print(f"warning: {warning}")
    for path in save(output, args.out / job_id):
        print(f"saved {path}")
    print(f"seed {output['seed']}, timings {json.dumps(output.get('timings', {}))}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, requests.RequestException) as err:  # a wrong API key, an endpoint that cannot be reached
        sys.exit(f"client.py: {err}")
