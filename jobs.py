"""One way for a job: a raw request in, a ready job out (checked, its image fetched, sized and cropped), or
one sentence of refusal.

`prepare(raw, settings)` is all the handler calls before generating: schemas.validate_input checks
every field and every rule that needs no image, then the image is fetched and decoded under the
worker's limits (video_utils, fetch), and the rules that need its size are applied (the output
size follows the image's aspect ratio where the request gives none). Every refusal is an
`InputError`; a `Ready` job needs nothing more from the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

from schemas import ImageJob, VideoJob, size_image_job, size_video_job, validate_input
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
