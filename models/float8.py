"""Float8 for the Wan transformer: the blocks' linears (WAN_FP8) and their self-attention (WAN_FP8_ATTENTION).

Weights: the blocks' linear layers become `Float8Linear` (float8 weights with one scale per row,
activations quantized per row at run time, torch._scaled_mm); a fused LoRA is re-quantized from the
stored weights (`requantizer`). Attention:
FlashAttention-3's float8 forward (fa3-fwd, Hopper) with centred keys/values and per-head scales,
emulated in plain torch on CPU so the tests run its arithmetic. Whether either applies is
decided once at start-up (plan.decide), which also runs `attention_self_check` on a Hopper GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from errors import first_line

# The self-check's bound on ||float8 - SDPA|| / ||SDPA||: about twice float8's rounding on random inputs
# (benchmarks/RESULTS.md, the float8 attention kernel).
SELF_CHECK_MAX_ERROR = 0.1


FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max


class Float8Linear(torch.nn.Linear):
    """A linear layer in float8 held as plain tensors: the weight (out, in) with one scale per output row, the
    input quantized per row as it arrives, both multiplied by torch._scaled_mm.

    No tensor subclass (torchao's float8 weights are one), so torch.compile traces it as it traces a bf16
    layer and torch's caches can hold the traced graph. To PEFT it is an nn.Linear; `compute_dtype` tells
    PEFT the dtype its LoRA layers run in.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a full-precision weight
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> Float8Linear:
        weight, scale = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.t(), bias=self.bias,
                               out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor in float8, one float32 scale per row (rows, 1): each row's largest value maps to 448."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FLOAT8_MAX
    return (t.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


def quantize(transformer: torch.nn.Module) -> None:
    """The transformer blocks' linear layers in float8 (weights, and activations per row at run time).

    The embedders and the output projection stay in bf16: they are small and most sensitive.
    """
    for name, module in list(transformer.named_modules()):
        for child, layer in list(module.named_children()):
            if isinstance(layer, torch.nn.Linear) and f"{name}.{child}".startswith("blocks."):
                setattr(module, child, Float8Linear.of(layer))


def save(transformer: torch.nn.Module, folder: Path) -> None:
    """A transformer with float8 layers as it is on the GPU: float8 weights with their scales, the rest in the
    dtypes it was loaded in, and its config; `load` reads it back without a bf16 copy or quantizing."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_config(folder)
    tensors = {name: tensor.contiguous() for name, tensor in transformer.state_dict().items()}
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def load(folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer `save` wrote, its tensors read straight onto `device`: about half the bytes of the bf16
    one, and no quantizing at start."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    # Parameters on no device until the file's tensors take their place; buffers (the rotary tables) real.
    with init_empty_weights(include_buffers=False):
        transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    quantize(transformer)
    transformer.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors", device=str(device)),
                                strict=True, assign=True)
    for layer in transformer.modules():
        if isinstance(layer, Float8Linear):
            layer.compute_dtype = dtype
    if dtype == torch.float32:  # on CPU everything but the float8 weights runs in float32, as from_pretrained gives it
        for tensor in transformer.parameters():
            if tensor.dtype != FLOAT8:
                tensor.data = tensor.data.float()
    return transformer.to(device).eval()  # as from_pretrained leaves a model


def requantizer(model_folder: str) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For fusing a LoRA under WAN_FP8: the transformer's weight `name` plus `delta`, quantized as WAN_FP8 does,
    as the float8 layer's tensors ("weight", "weight_scale").

    From the weight in the model files, not the float8 one: that lies on the float8 grid, where a LoRA's
    change smaller than half a step would round back to nothing.
    """
    from safetensors import safe_open

    folder = Path(model_folder) / "transformer"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    opened: dict[str, Any] = {}  # one open per file, not per weight

    def requantize(name: str, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        file = files.get(name, "diffusion_pytorch_model.safetensors")
        if file not in opened:
            opened[file] = safe_open(folder / file, framework="pt")
        weight, scale = quantize_rows(opened[file].get_tensor(name).to(delta.device, delta.dtype) + delta)
        return {"weight": weight, "weight_scale": scale}

    return requantize


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """Attention with query, key and value rounded to float8 (e4m3) under one scale per batch and head.

    Tensors are (batch, tokens, heads, head_dim), as diffusers dispatches them. On CUDA the kernel is
    FlashAttention-3's float8 forward (fa3-fwd, Hopper); on CPU the same rounding is done in plain torch.
    """
    if attn_mask is not None or is_causal:
        raise ValueError(f"WAN_FP8_ATTENTION runs unmasked, non-causal attention only, got attn_mask "
                         f"{'set' if attn_mask is not None else 'None'} and is_causal={is_causal}")
    # Softmax ignores what all keys share (q . mean(k) is one constant per query row), and each output row
    # is a weighted mean of v's rows: with both means taken out, float8 rounds only what varies.
    key = key - key.mean(dim=1, keepdim=True)
    v_mean = value.mean(dim=1, keepdim=True)
    (q, q_scale), (k, k_scale), (v, v_scale) = (to_float8(t) for t in (query, key, value - v_mean))
    scale = scale or q.shape[-1] ** -0.5
    if q.device.type == "cuda":
        import fa3_fwd_interface

        # The registered custom op itself (one node for torch.compile, with its fake kernel); the public
        # flash_attn_func wraps it in an autograd.Function, which inference does not need.
        out = fa3_fwd_interface._flash_attn_forward(q, k, v, q_descale=q_scale, k_descale=k_scale,
                                                    v_descale=v_scale, softmax_scale=scale)[0]
    else:  # FlashAttention-3's arithmetic: the probabilities exp(s - row max), in [0, 1], are float8 too
        q, k, v = (x.float().mul(s[:, None, :, None]).transpose(1, 2)
                   for x, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
        logits = q @ k.transpose(-1, -2) * scale
        p = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        out = ((p.to(torch.float8_e4m3fn).float() @ v) / p.sum(dim=-1, keepdim=True)).transpose(1, 2)
    return (out.float() + v_mean).to(query.dtype)


def to_float8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t / scale in float8_e4m3fn, and the scale (batch, heads): each head's largest value maps to 448."""
    # The scale in t's dtype, so the division makes no float32 copy of t; the kernel gets that same scale.
    scale = (t.abs().amax(dim=(1, 3)).float().clamp(min=1e-6) / torch.finfo(torch.float8_e4m3fn).max).to(t.dtype)
    return (t / scale[:, None, :, None]).to(torch.float8_e4m3fn), scale.float()


def attend_in_float8(transformer: torch.nn.Module) -> None:
    """Each block's self-attention (32,760 tokens at 480x832x81; quadratic in them, unlike the linears) in
    float8; cross-attention over the 769 text and image tokens stays bf16. diffusers dispatches attention by
    backend name, and the worker serves FlashAttention-3's name with its float8 function (it loads no other
    FA3)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    # Process-wide: anything else set to "_flash_3" would get float8 too, and nothing else here is.
    _AttentionBackendRegistry.register(AttentionBackendName._FLASH_3)(attention)
    for block in transformer.blocks:
        block.attn1.set_attention_backend(AttentionBackendName._FLASH_3.value)


def attention_self_check() -> str | None:
    """On a Hopper GPU: why float8 attention cannot serve here (fa3-fwd missing, failing, or disagreeing with
    SDPA on a small input), or None. A CUDA 12 image lacks the libcudart.so.13 that fa3-fwd links."""
    try:
        import fa3_fwd_interface  # noqa: F401
    except (ImportError, OSError) as err:
        return f"fa3-fwd does not load ({first_line(err)})"
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 512, 8, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    try:
        out = attention(q, k, v).float()
    except Exception as err:  # noqa: BLE001 - any failure of the kernel turns the switch off, not the worker
        return f"its kernel failed on a small input ({type(err).__name__}: {first_line(err)})"
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    error = ((out - ref.float()).norm() / ref.float().norm()).item()
    if not error <= SELF_CHECK_MAX_ERROR:
        return f"its output differs from SDPA's by {error:.1%} on a small input (at most {SELF_CHECK_MAX_ERROR:.0%})"
    return None
