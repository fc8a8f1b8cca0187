"""One way for a job: a raw request in, a ready job out (checked, its image fetched, sized and cropped), or
one sentence of refusal.

`prepare(raw, settings)` is all the handler calls before generating: schemas.validate_input checks
every field and every rule that needs no image, then the image is fetched and decoded under the
worker's limits (video_utils, fetch), and the rules that need its size are applied (the output
size follows the image's aspect ratio where the request gives none). Every refusal is an
`InputError`; a `Ready` job needs nothing more from the request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from PIL import Image

from errors import InputError
from schemas import IMAGE_SIDES, VIDEO_MAX_AREA, VIDEO_SIDES, ImageJob, VideoJob, check_tokens, validate_input
from settings import Settings
from video_utils import cover, load_image_input


@dataclass(frozen=True)
class Ready:
    """A job the models can run as it is: sizes final, its image (img2img start, or the video's first
    frame) already at the job's size."""

    job: ImageJob | VideoJob
    image: Image.Image | None
    fetch_s: float | None = None  # seconds spent fetching and decoding the image


def prepare(raw: object, settings: Settings) -> Ready:
    """The request as a ready job; raises InputError with one sentence on the first problem found."""
    job = validate_input(raw, settings)
    if job.image_url is None:
        return Ready(job, None)
    start = time.perf_counter()
    image = load_image_input(job.image_url, "image_url", max_bytes=settings.max_input_image_bytes,
                             max_pixels=settings.max_input_image_pixels, timeout_s=settings.fetch_timeout_s)
    if isinstance(job, VideoJob):
        job = size_video_job(job, image.size, settings)
        # The first frame is the input scaled and center-cropped to the video's size, never stretched.
        image = cover(image, job.width, job.height)
    else:
        job = size_image_job(job, image.size)
        image = image.resize((job.width, job.height))
    return Ready(job, image, time.perf_counter() - start)


def fit_area(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """Size with the aspect ratio of width x height and about `area` pixels, each side a multiple.

    This is the recipe of diffusers' Wan I2V example (1280x720 -> 832x464 inside 480x832).
    """
    aspect = height / width
    out_h = round(math.sqrt(area * aspect)) // multiple * multiple
    out_w = round(math.sqrt(area / aspect)) // multiple * multiple
    return out_w, out_h


def _check_derived_size(image_size: tuple[int, int], size: tuple[int, int], sides: tuple[int, int],
                        advice: str) -> None:
    if not all(sides[0] <= side <= sides[1] for side in size):
        raise InputError(f"Field 'image_url' is a {image_size[0]}x{image_size[1]} image whose aspect ratio gives a "
                         f"{size[0]}x{size[1]} result; sides from {sides[0]} to {sides[1]} are allowed, so {advice}.")


def size_image_job(job: ImageJob, image_size: tuple[int, int]) -> ImageJob:
    """img2img keeps the input's aspect ratio at the requested pixel count (multiples of 8 for the VAE)."""
    size = fit_area(*image_size, job.width * job.height, 8)
    advice = "send a less elongated image"
    if IMAGE_SIDES[0] * max(image_size) <= IMAGE_SIDES[1] * min(image_size):  # another pixel count would fit it
        advice += f" or a {'smaller' if max(size) > IMAGE_SIDES[1] else 'larger'} height x width"
    _check_derived_size(image_size, size, IMAGE_SIDES, advice)
    return replace(job, width=size[0], height=size[1])


def size_video_job(job: VideoJob, image_size: tuple[int, int], settings: Settings) -> VideoJob:
    """A video without height/width takes the input's aspect ratio inside 480x832 (multiples of 16)."""
    if job.height is not None:
        return job
    size = fit_area(*image_size, VIDEO_MAX_AREA, 16)
    _check_derived_size(image_size, size, VIDEO_SIDES,
                        "send height and width explicitly or a less elongated image")
    job = replace(job, width=size[0], height=size[1])
    check_tokens(job, settings)
    return job
