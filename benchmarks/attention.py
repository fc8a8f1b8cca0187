#!/usr/bin/env python3
"""WAN_FP8_ATTENTION's kernel alone: one Wan2.1 self-attention at 480x832x81 (32,760 tokens, 40 heads x 128)
in PyTorch SDPA (bf16, what plain diffusers runs) and in the worker's float8_attention (FlashAttention-3
float8), eager and compiled; milliseconds (median of CUDA-event timings) and relative error against SDPA.

    python benchmarks/attention.py --out results/attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from bench import meta  # also puts the worker's modules on the path

from models.float8 import attention as float8_attention


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from triton.testing import do_bench

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, args.tokens, 40, 128, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    offset = 3 * torch.randn(1, 1, 40, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    exact, shifted = sdpa(q, k, v).float(), sdpa(q, k + offset, v + offset).float()
    results = {**meta("attention.py", sys.argv[1:]), "tokens": args.tokens, "ms": {}, "rel_err": {}}
    for name, fn in (("sdpa_bf16", sdpa), ("float8", float8_attention),
                     ("float8_compiled", torch.compile(float8_attention, fullgraph=True))):
        results["ms"][name] = round(do_bench(lambda f=fn: f(q, k, v), warmup=200, rep=1000, return_mode="median"), 3)
        results["rel_err"][name] = round(float((fn(q, k, v).float() - exact).norm() / exact.norm()), 5)
        results["rel_err"][name + "_shared_offsets"] = round(
            float((fn(q, k + offset, v + offset).float() - shifted).norm() / shifted.norm()), 5)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for name, ms in results["ms"].items():
        print(f"{name:16s} {ms:8.3f} ms  error {results['rel_err'][name]:.4f} "
              f"(shared offsets {results['rel_err'][name + '_shared_offsets']:.5f})")


if __name__ == "__main__":
    main()
