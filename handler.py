"""RunPod serverless entrypoint: one job in, images or an MP4 out.

    python handler.py                          # runs test_input.json once, writes outputs/ (local test)
    python handler.py --test_input '{"input": {...}}'
    python handler.py --rp_serve_api --rp_api_port 8000   # local /run, /runsync, /status API

`main` reads the settings, starts reading the weights the worker needs first (a cold start's longest
part, so it begins before Python spends seconds importing torch and diffusers), then builds the worker
(worker.py) and hands its job function to runpod. Importing this module loads no model and starts
nothing; `runpod.serverless.start` runs only under __main__.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

import logs
import readahead
from errors import SettingsError
from settings import load_settings

log = logging.getLogger("worker")


def main() -> None:
    faulthandler.enable()  # a crash in native code (a segfault) leaves every thread's Python stack in the log
    logs.set_up()
    try:
        settings = load_settings(os.environ)
        reading = readahead.at_start(settings)
        # torch, diffusers and the worker's own modules: seconds of imports while the weights come off the disk.
        from folders import check_folders
        from storage import PayloadFilter
        from video_utils import remove_leftovers
        from worker import build_worker, local_handler

        log.addFilter(PayloadFilter())  # no megabytes of base64 in the worker's own lines
        log.info("start-up: imports %.1f s (process start to here)", logs.seconds_since_start())
        log.info("worker settings: %s", settings.summary())
        worker = build_worker(settings, reading)
    except SettingsError as err:  # a setting that cannot work (parallel's ParallelError too): one line, exit 2
        log.error("%s", err)
        sys.exit(2)
    local_test = "--rp_serve_api" not in sys.argv and not settings.on_runpod
    remove_leftovers()  # the MP4 temp folders of a worker that was killed mid-job
    for problem in check_folders(settings, local_outputs=local_test):
        log.warning("%s", problem)
    import runpod
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(settings.runpod_log_level)
    worker.start_up()
    runpod.serverless.start({"handler": local_handler(worker) if local_test else worker.handle})


if __name__ == "__main__":
    main()
