#!/usr/bin/env python3
"""The fast preset's time outside the transformer: the full-size Wan VAE (random weights) encoding a 480x832x81
conditioning video (the image, then black frames) and decoding 21 latent frames, as diffusers runs it, with
channels-last 3D convolutions, with those and the encoder skipping repeated work (the worker's, "worker"), with
cuDNN autotuning, autotuning and channels-last, and compiled; then the decoded frames' trip to uint8 (numpy, as
after output_type="np", or on the GPU, the worker's) and the MP4 encode. Seconds (median of 3 after a first
call, whose time is kept too) and relative error against the default.

    python benchmarks/vae.py --out results/vae.json                  # bf16 (WAN_VAE_DTYPE=bfloat16)
    python benchmarks/vae.py --dtype float32 --out results/vae-float32.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench import frames_to_mp4, input_image, meta  # also puts the worker's modules on the path

from download_weights import random_component
from models.vae import channels_last_convs, reused_encoder_work, uint8_frames

VARIANTS = ("default", "channels_last", "worker", "cudnn_benchmark", "channels_last_benchmark", "compiled")


def numpy_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames in [0, 1] -> uint8 in numpy: what the worker did after output_type="np" before uint8_frames."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def timed(fn, runs: int = 3) -> tuple[torch.Tensor, float, float]:
    """(result, first call s, median of `runs` later calls s)."""
    times = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, round(times[0], 3), round(statistics.median(times[1:]), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS[:3]), help=f"from {','.join(VARIANTS)}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    image = torch.from_numpy(np.asarray(input_image(832, 480), dtype=np.float32) / 127.5 - 1.0)
    dtype = getattr(torch, args.dtype)
    video = torch.cat([image.permute(2, 0, 1)[None, :, None].cuda(), torch.zeros(1, 3, 80, 480, 832, device="cuda")],
                      dim=2).to(dtype)
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g, dtype=dtype)
    results = {**meta("vae.py", sys.argv[1:]), "dtype": args.dtype, "variants": {}}
    # Frames: a moving picture, as the pipeline's decoded tensor (B, C, F, H, W) in [-1, 1].
    frames = torch.stack([torch.roll(image, 4 * i, dims=1) for i in range(81)]).permute(3, 0, 1, 2)[None].cuda()
    _, _, np_s = timed(lambda: numpy_uint8((frames / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).float().cpu().numpy()))
    uint8, _, gpu_s = timed(lambda: uint8_frames((frames[0] / 2 + 0.5).clamp(0, 1).transpose(0, 1)))
    start = time.perf_counter()
    mp4 = frames_to_mp4(uint8, 16)
    results["frames"] = {"to_uint8_numpy_s": np_s, "to_uint8_gpu_s": gpu_s,
                         "mp4_s": round(time.perf_counter() - start, 3), "mp4_bytes": len(mp4)}
    print("frames", results["frames"])
    reference = {}
    for name in args.variants.split(","):
        torch.backends.cudnn.benchmark = "benchmark" in name
        vae = random_component("wan_vae", "full", "cuda").to(dtype)
        fmt = torch.contiguous_format
        if name.startswith("channels_last") or name == "worker":
            channels_last_convs(vae)
            fmt = torch.channels_last_3d  # the inputs too (in the worker the first convolution converts them)
        if name == "compiled":
            vae.encoder.compile()
            vae.decoder.compile()
        x, z = video.to(memory_format=fmt), latents.to(memory_format=fmt)
        reuse = reused_encoder_work(vae) if name == "worker" else contextlib.nullcontext()
        with torch.no_grad(), reuse:
            enc, enc_first, enc_s = timed(lambda vae=vae, x=x: vae.encode(x).latent_dist.mode())
            dec, dec_first, dec_s = timed(lambda vae=vae, z=z: vae.decode(z).sample)
        row = {"encode_s": enc_s, "decode_s": dec_s, "encode_first_s": enc_first, "decode_first_s": dec_first}
        if name == "channels_last":
            layout_only = enc
        if name == "worker" and "channels_last" in results["variants"]:  # skipping work changes no value
            row["encode_equals_channels_last"] = bool(torch.equal(enc, layout_only))
        if not reference:
            reference = {"encode": enc.float(), "decode": dec.float()}
        else:
            for part, out in (("encode", enc), ("decode", dec)):
                ref = reference[part]
                row[f"{part}_rel_err"] = round(float((out.float() - ref).norm() / ref.norm()), 5)
        results["variants"][name] = row
        print(name, row, flush=True)
        if args.out:  # after every variant: a compile that runs past the call's limit keeps the others
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
        del vae, enc, dec, x, z
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
