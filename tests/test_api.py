"""The worker as RunPod runs it locally: `python handler.py --rp_serve_api`, jobs over HTTP POST /runsync."""

from __future__ import annotations

import base64
import io

import pytest
from conftest import decode_data_uri, png_b64
from media import probe_mp4
from PIL import Image

SMALL_VIDEO = {"mode": "video", "prompt": "waves roll in", "height": 64, "width": 64, "num_frames": 5,
               "num_inference_steps": 2, "seed": 1}
SMALL_IMAGE = {"prompt": "a lighthouse", "height": 128, "width": 128, "num_inference_steps": 2,
               "refiner_inference_steps": 4, "seed": 1}


def test_image_job_over_http(api):
    reply = api.runsync({**SMALL_IMAGE, "num_images": 3, "width": 136})
    assert reply["status"] == "COMPLETED", reply
    images = [Image.open(io.BytesIO(decode_data_uri(u, "image/png"))) for u in reply["output"]["images"]]
    assert [(im.format, im.size) for im in images] == [("PNG", (136, 128))] * 3


def test_video_job_over_http(api):
    reply = api.runsync({**SMALL_VIDEO, "image_url": "data:image/png;base64," + png_b64(), "num_frames": 13,
                         "fps": 8, "width": 80})
    assert reply["status"] == "COMPLETED", reply
    video = probe_mp4(decode_data_uri(reply["output"]["video"], "video/mp4"))
    assert (video["frames"], video["fps"], video["width"], video["height"]) == (13, 8, 80, 64)
    assert video["codec"].startswith("h264") and video["pix_fmt"].startswith("yuv420p")
    assert reply["output"]["duration_s"] == 1.625


TRUNCATED_PNG = png_b64(64, 64)[:300]
TEXT_B64 = base64.b64encode(b"this is just some text, not a picture").decode()
V = {"mode": "video", "prompt": "x", "image_url": png_b64()}

BAD_INPUTS = [
    ("unknown field", {"prompt": "x", "steps": 3},
     "Field 'steps' is not accepted in mode 'image'; allowed fields are: mode, prompt, negative_prompt, height, "
     "width, seed, scheduler, num_inference_steps, refiner_inference_steps, guidance_scale, strength, image_url, "
     "num_images, high_noise_frac, loras, output."),
    ("wrong type", {"prompt": "x", "num_inference_steps": "many"},
     "Field 'num_inference_steps' must be an integer from 2 to 150, got string 'many'."),
    ("wrong type bool", {**V, "num_frames": True},
     "Field 'num_frames' must be an integer from 5 to 161 of the form 4k+1, got boolean True."),
    ("missing prompt (video)", {"mode": "video", "image_url": png_b64()},
     "Field 'prompt' is required in mode 'video' and must be a string of at most 2,000 characters."),
    ("missing prompt (image)", {"height": 512},
     "Field 'prompt' is required in mode 'image' unless image_url is given."),
    ("missing image_url", {"mode": "video", "prompt": "x"},
     "Field 'image_url' is required in mode 'video' and must be a string of at most 28,000,000 characters."),
    ("num_frames not 4k+1", {**V, "num_frames": 80},
     "Field 'num_frames' must be an integer from 5 to 161 of the form 4k+1, got number 80."),
    ("num_frames too many", {**V, "num_frames": 165},
     "Field 'num_frames' must be an integer from 5 to 161 of the form 4k+1, got number 165."),
    ("num_frames too few", {**V, "num_frames": 1},
     "Field 'num_frames' must be an integer from 5 to 161 of the form 4k+1, got number 1."),
    ("fps zero", {**V, "fps": 0}, "Field 'fps' must be an integer from 1 to 60, got number 0."),
    ("fps negative", {**V, "fps": -5}, "Field 'fps' must be an integer from 1 to 60, got number -5."),
    ("height not multiple of 16", {**V, "height": 488, "width": 832},
     "Field 'height' must be an integer from 64 to 1280 that is a multiple of 16, got number 488."),
    ("width out of range", {**V, "height": 480, "width": 4096},
     "Field 'width' must be an integer from 64 to 1280 that is a multiple of 16, got number 4096."),
    ("height without width", {**V, "height": 480},
     "Field 'height' was given without its partner; send both height and width, or neither to follow the "
     "image's aspect ratio."),
    ("image height not multiple of 8", {"prompt": "x", "height": 1001},
     "Field 'height' must be an integer from 128 to 2048 that is a multiple of 8, got number 1001."),
    ("scheduler not in list", {"prompt": "x", "scheduler": "euler"},
     "Field 'scheduler' must be one of 'DDIM', 'PNDM', 'KLMS', 'K_EULER', 'K_EULER_ANCESTRAL', 'DPMSolverMultistep', "
     "'DPMSolverSinglestep', 'DPMSolverMultistep_Karras', 'UniPC', got string 'euler'."),
    ("num_images too many", {"prompt": "x", "num_images": 5},
     "Field 'num_images' must be an integer from 1 to 4, got number 5."),
    ("num_images zero", {"prompt": "x", "num_images": 0},
     "Field 'num_images' must be an integer from 1 to 4, got number 0."),
    ("image_url is text", {**V, "image_url": TEXT_B64},
     "Field 'image_url' is not a decodable image (unrecognized data starting 'this is just som'); send a PNG, "
     "JPEG, WebP, GIF, BMP or TIFF image."),
    ("image_url is a truncated PNG", {**V, "image_url": TRUNCATED_PNG},
     "Field 'image_url' is not a decodable image (truncated or corrupt data starting '.PNG........IHDR'); "
     "send a PNG, JPEG, WebP, GIF, BMP or TIFF image."),
    ("image_url is empty", {**V, "image_url": ""},
     "Field 'image_url' holds no data; send a PNG, JPEG, WebP, GIF, BMP or TIFF image."),
    ("image img2img url is not an image", {"prompt": "x", "image_url": "data:image/png;base64," + TEXT_B64},
     "Field 'image_url' is not a decodable image (unrecognized data starting 'this is just som'); send a PNG, "
     "JPEG, WebP, GIF, BMP or TIFF image."),
    ("unknown mode", {"mode": "audio", "prompt": "x"},
     "Field 'mode' must be one of 'image', 'video', got string 'audio'."),
]


@pytest.mark.parametrize(("case", "job_input", "error"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_one_sentence_and_the_worker_keeps_serving(api, case, job_input, error):
    reply = api.runsync(job_input)
    assert reply["status"] == "FAILED"
    assert reply["error"] == error


def test_a_valid_job_succeeds_after_every_kind_of_failure(api):
    for _, job_input, _ in BAD_INPUTS:
        assert api.runsync(job_input)["status"] == "FAILED"
    reply = api.runsync({**SMALL_VIDEO, "image_url": png_b64()})
    assert reply["status"] == "COMPLETED", reply
    assert probe_mp4(decode_data_uri(reply["output"]["video"], "video/mp4"))["frames"] == 5


def test_run_then_status_returns_the_result(api):
    import requests

    queued = requests.post(f"{api.url}/run", json={"input": SMALL_IMAGE}, timeout=30).json()
    assert queued["status"] == "IN_PROGRESS"
    done = requests.post(f"{api.url}/status/{queued['id']}", timeout=300).json()
    assert done["status"] == "COMPLETED", done
    assert Image.open(io.BytesIO(decode_data_uri(done["output"]["image_url"], "image/png"))).size == (128, 128)
