"""fp8 linears of the released MAGI-1 distill+quant checkpoints (`inference_weight.fp8.distill`).

In transformer layers 1 .. L-2 (the first and last layers stay bf16) seven linears hold float8_e4m3fn weights:

    per-tensor  (Fp8PerTensorLinear):  self_attention.linear_qkv.{q,qx,k,v}, mlp.linear_fc1
        weight (1, out, in) fp8, weight_scale (1,) fp32, input_scale (in,) fp32
    per-channel (Fp8PerChannelLinear): self_attention.linear_proj, mlp.linear_fc2
        weight (1, out, in) fp8, weight_scale (1,) fp32, input_scale (1,) fp32, smooth_scale (1, in) fp32

Both compute the same thing; they differ only in which tensor divides the activation:

    a = fp8(bf16(clamp(x.float() / divisor, -448, 448)))        divisor: input_scale | smooth_scale
    y = bf16((a @ W_q^T, fp32 accumulation) * (a_scale * weight_scale))     a_scale: one fp32 number

The released code computes `y` with flashinfer's `bmm_fp8` (cuBLASLt). On CPU we dequantise exactly; on CUDA
we use `torch._scaled_mm`, the same cuBLASLt fp8 GEMM. `linear_proj` in these layers is therefore computed from
fp8 and returns bf16, not the fp32 of the bf16 model. The released calibration (activation statistics and
smoothing rule) is not public; `calibrate_input_absmax` + `quantize_dit_state_dict` are our own recipe for
producing checkpoints in the released layout. Tensor parallelism is not supported (the fp8 modules do no TP
communication).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

PER_TENSOR_LINEARS = (
    "self_attention.linear_qkv.q",
    "self_attention.linear_qkv.qx",
    "self_attention.linear_qkv.k",
    "self_attention.linear_qkv.v",
    "mlp.linear_fc1",
)
PER_CHANNEL_LINEARS = ("self_attention.linear_proj", "mlp.linear_fc2")
LAYER_PREFIX = "videodit_blocks.layers"

# SmoothQuant's default migration strength: half of each input channel's range moves into the weights.
DEFAULT_SMOOTH_ALPHA = 0.5


def fp8_layer_indices(num_layers: int) -> range:
    """Global indices of the quantised layers: 1 .. L-2. With L <= 2 the range is empty (nothing is quantised)."""
    return range(1, num_layers - 1)


def fp8_module_names(num_layers: int) -> list[str]:
    """Qualified names of every fp8 linear of an L-layer DiT (per-tensor ones first in each layer)."""
    names = PER_TENSOR_LINEARS + PER_CHANNEL_LINEARS
    return [f"{LAYER_PREFIX}.{i}.{name}" for i in fp8_layer_indices(num_layers) for name in names]


# ---------------------------------------------------------------------------------------------- kernels
def quantize_activation(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """x / divisor (broadcast over the last dim) -> clamp to +-448 -> bf16 -> fp8 e4m3fn.

    The bf16 step is a second rounding (a value just above an fp8 midpoint can land on it and then tie to even);
    the released code has it, so we keep it for bit parity. The released code also works in row blocks of
    ~2^28 elements: that bounds memory only, the operation is elementwise, so one pass gives the same values.
    """
    return (x.float() / divisor.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.bfloat16).to(FP8)


def scaled_mm_applicable(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._scaled_mm` can run `a (M, in) @ weight (out, in)^T`.

    Conditions: a CUDA tensor, a GPU with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper and later),
    `in` and `out` multiples of 16 (cuBLASLt's fp8 layout requirement; M is free), and at least one row.
    """
    if not a.is_cuda or not hasattr(torch, "_scaled_mm") or a.shape[0] == 0:
        return False
    if torch.cuda.get_device_capability(a.device) < (8, 9):
        return False
    out_features, in_features = weight.shape
    return in_features % 16 == 0 and out_features % 16 == 0


def fp8_matmul(a: torch.Tensor, weight: torch.Tensor, a_scale: torch.Tensor, weight_scale: torch.Tensor,
               use_scaled_mm: bool = True) -> torch.Tensor:
    """bf16((a @ weight^T) * (a_scale * weight_scale)) with fp32 accumulation.

    a (M, in) fp8, weight (out, in) fp8, a_scale and weight_scale one-element fp32 tensors (per-tensor scales,
    as cuBLASLt's scale pointers). The two scales are multiplied first, as the GEMM's single alpha.
    """
    if use_scaled_mm and scaled_mm_applicable(a, weight):
        # weight.t() is column-major, which is the layout _scaled_mm wants for its second operand. No fast
        # accumulation: Hopper's fast mode accumulates in reduced precision; the released GEMM is fp32.
        return torch._scaled_mm(a.contiguous(), weight.t(), scale_a=a_scale.float(), scale_b=weight_scale.float(),
                                out_dtype=torch.bfloat16, use_fast_accum=False)
    # Exact dequantisation: fp8 values are exact in fp32. Autocast off, or an enclosing bf16 autocast would
    # round the accumulator to bf16 before the scales are applied.
    with torch.autocast(a.device.type, enabled=False):
        acc = a.float() @ weight.float().t()
        return (acc * (a_scale.float() * weight_scale.float())).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- modules
class _Fp8Linear(nn.Module):
    """Shared forward; subclasses declare the parameters and say which tensor divides the activation."""

    def __init__(self, in_features: int, out_features: int, use_scaled_mm: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Exact path on CPU always; on CUDA too when False (tests, debugging).
        self.use_scaled_mm = use_scaled_mm
        # Parameters (not buffers) as in the released modules; placeholders until a checkpoint is loaded.
        self.weight = nn.Parameter(torch.zeros(1, out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)

    def activation_divisor(self) -> torch.Tensor:
        raise NotImplementedError

    def activation_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects {self.in_features} input features, got shape {tuple(x.shape)}")
        a = quantize_activation(x.reshape(-1, self.in_features), self.activation_divisor())
        y = fp8_matmul(a, self.weight[0], self.activation_scale(), self.weight_scale, self.use_scaled_mm)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3fn, bf16 out"


class Fp8PerTensorLinear(_Fp8Linear):
    """The released `PerTensorQuantizedFp8Linear` (linear_qkv.{q,qx,k,v}, mlp.linear_fc1).

    `input_scale` has length `in` but the GEMM treats it as a per-tensor scale: the whole vector divides the
    activation (broadcast over the last dim), while only element 0 dequantises (bmm_fp8 hands the tensor to
    cuBLASLt as a scale *pointer*, which reads one float). Both uses agree only when all entries are equal, which
    is what `quantize_per_tensor` writes; we still honour a non-uniform vector exactly as the released kernels
    do, so any released checkpoint reproduces.
    """

    def __init__(self, in_features: int, out_features: int, use_scaled_mm: bool = True):
        super().__init__(in_features, out_features, use_scaled_mm)
        self.input_scale = nn.Parameter(torch.ones(in_features, dtype=torch.float32), requires_grad=False)

    def activation_divisor(self) -> torch.Tensor:
        return self.input_scale

    def activation_scale(self) -> torch.Tensor:
        return self.input_scale[:1]


class Fp8PerChannelLinear(_Fp8Linear):
    """The released `PerChannelQuantizedFp8Linear` (self_attention.linear_proj, mlp.linear_fc2).

    SmoothQuant-style: the activation is divided by `smooth_scale` (one divisor per input channel, which already
    includes the activation's quantisation scale), and `input_scale` (one number) dequantises. The weights carry
    the inverse smoothing, W_q * weight_scale ~ W * smooth_scale / input_scale (see `quantize_per_channel`).
    """

    def __init__(self, in_features: int, out_features: int, use_scaled_mm: bool = True):
        super().__init__(in_features, out_features, use_scaled_mm)
        self.input_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)
        self.smooth_scale = nn.Parameter(torch.ones(1, in_features, dtype=torch.float32), requires_grad=False)

    def activation_divisor(self) -> torch.Tensor:
        return self.smooth_scale

    def activation_scale(self) -> torch.Tensor:
        return self.input_scale


# ---------------------------------------------------------------------------------------------- model conversion
def is_fp8_linear(module: nn.Module) -> bool:
    return isinstance(module, _Fp8Linear)


def _is_tensor_parallel(linear: nn.Module) -> bool:
    group = getattr(linear, "tp_group", None)
    if group is not None and group.size() > 1:
        return True
    # Without a group (torch.distributed not initialised) a sharded weight still shows in its shape.
    full = (getattr(linear, "output_size", None), getattr(linear, "input_size", None))
    return None not in full and tuple(linear.weight.shape) != full


def convert_dit_to_fp8(model: nn.Module) -> nn.Module:
    """Swap the linears of layers 1 .. L-2 for fp8 ones in place, returning the model.

    Afterwards `model.state_dict()` has the released fp8 key set, so a released fp8 checkpoint (or the output of
    `quantize_dit_state_dict`) loads with `strict=True`; the new parameters are placeholders until then. With
    L <= 2 there is nothing to convert and the model is returned unchanged. Calling it twice is harmless.
    """
    if getattr(model, "dtype", torch.bfloat16) != torch.bfloat16:
        # fp8 linears return bf16 like the released model; a fp32/fp16 residual stream would then mix dtypes.
        raise ValueError(f"fp8 linears need a bfloat16 model (model.params_dtype='bfloat16'), got {model.dtype}")
    layers = model.get_submodule(LAYER_PREFIX)
    # A pipeline stage holds some of the layers, keyed by their global index: which ones are fp8 follows
    # from the whole model's depth.
    num_layers = model.cfg.num_layers if hasattr(model, "cfg") else len(layers)
    swaps = []
    for i in fp8_layer_indices(num_layers):
        if str(i) not in layers._modules:
            continue
        for name in PER_TENSOR_LINEARS + PER_CHANNEL_LINEARS:
            parent_name, _, attr = name.rpartition(".")
            parent = layers[i].get_submodule(parent_name)
            old = getattr(parent, attr)
            if isinstance(old, _Fp8Linear):
                continue
            if _is_tensor_parallel(old):
                raise NotImplementedError(f"fp8 with tensor parallel is not supported yet ({LAYER_PREFIX}.{i}.{name} is sharded)")
            swaps.append((parent, attr, old, Fp8PerTensorLinear if name in PER_TENSOR_LINEARS else Fp8PerChannelLinear))
    # Checked everything first: a refused conversion leaves the model untouched.
    for parent, attr, old, cls in swaps:
        out_features, in_features = old.weight.shape
        with torch.device(old.weight.device):
            setattr(parent, attr, cls(in_features, out_features))
    return model


# ---------------------------------------------------------------------------------------------- quantisation
def _per_tensor_scale(absmax: torch.Tensor) -> torch.Tensor:
    # absmax / 448 maps the largest magnitude onto fp8's largest value; an all-zero tensor gets scale 1.
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))


def _quantize_weight(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    # Weights round once, fp32 -> fp8 (only activations take the released bf16 detour).
    scale = _per_tensor_scale(weight.abs().amax()).reshape(1)
    q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return {"weight": q.unsqueeze(0), "weight_scale": scale}


def _channel_absmax(input_absmax: torch.Tensor, in_features: int) -> torch.Tensor:
    absmax = input_absmax.detach().float().flatten()
    if absmax.numel() == 1:
        absmax = absmax.expand(in_features)
    if absmax.numel() != in_features:
        raise ValueError(f"input absmax has {absmax.numel()} entries, the linear has {in_features} input features")
    return absmax


def quantize_per_tensor(weight: torch.Tensor, input_absmax: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Released per-tensor layout from a (out, in) weight.

    input_scale: max(input_absmax) / 448 written to all `in` entries (see `Fp8PerTensorLinear` for why one value);
    `input_absmax` may be per input channel or one number. Without calibration it is 1 (activations up to
    +-448, which covers a DiT's normalised activations; e4m3's relative step is the same from 2^-6 to 448).
    """
    out = _quantize_weight(weight)
    in_features = weight.shape[1]
    if input_absmax is None:
        scale = torch.ones((), device=weight.device)
    else:
        scale = _per_tensor_scale(_channel_absmax(input_absmax, in_features).amax()).to(weight.device)
    out["input_scale"] = scale.expand(in_features).clone()
    return out


def quantize_per_channel(weight: torch.Tensor, input_absmax: Optional[torch.Tensor] = None,
                         alpha: float = DEFAULT_SMOOTH_ALPHA) -> dict[str, torch.Tensor]:
    """Released per-channel layout from a (out, in) weight, with SmoothQuant smoothing.

    With per-input-channel activation absmax a_j and weight column absmax w_j (SmoothQuant, Xiao et al. 2023):
        s_j          = a_j^alpha / w_j^(1 - alpha)          moves activation outliers into the weights
        input_scale  = max_j(a_j / s_j) / 448               per-tensor scale of the smoothed activation
        smooth_scale = s_j * input_scale                    the one divisor the forward applies
        weight       = fp8(W diag(s) / weight_scale),  weight_scale = absmax(W diag(s)) / 448
    so that x / smooth_scale * input_scale @ (W diag(s))^T = x @ W^T. Without calibration s = 1 and
    input_scale = 1 (no smoothing; activations up to +-448).
    """
    w = weight.float()
    in_features = w.shape[1]
    if input_absmax is None:
        smooth = torch.ones(in_features, device=w.device)
        scale = torch.ones((), device=w.device)
    else:
        # SmoothQuant's floor keeps dead channels (absmax 0) from producing 0 or inf divisors.
        a = _channel_absmax(input_absmax, in_features).to(w.device).clamp(min=1e-5)
        wmax = w.abs().amax(dim=0).clamp(min=1e-5)
        smooth = a.pow(alpha) / wmax.pow(1.0 - alpha)
        scale = _per_tensor_scale((a / smooth).amax())
    out = _quantize_weight(w * smooth)
    out["input_scale"] = scale.reshape(1)
    out["smooth_scale"] = (smooth * scale).reshape(1, in_features)
    return out


def quantize_dit_state_dict(state_dict: Mapping[str, torch.Tensor], num_layers: int,
                            input_absmax: Optional[Mapping[str, torch.Tensor]] = None,
                            smooth_alpha: float = DEFAULT_SMOOTH_ALPHA) -> dict[str, torch.Tensor]:
    """A released-layout fp8 state dict from a bf16/fp32 DiT state dict (our keys = the released keys).

    The linears of layers 1 .. L-2 are replaced by their fp8 entries; everything else is passed through.
    `input_absmax` maps module names (e.g. "videodit_blocks.layers.1.mlp.linear_fc1", as returned by
    `calibrate_input_absmax`) to per-input-channel activation absmax; without it, default scales (see
    `quantize_per_tensor` / `quantize_per_channel`). The input is not modified.
    """
    out = dict(state_dict)
    for i in fp8_layer_indices(num_layers):
        for name in PER_TENSOR_LINEARS + PER_CHANNEL_LINEARS:
            module = f"{LAYER_PREFIX}.{i}.{name}"
            key = f"{module}.weight"
            if key not in out:
                raise KeyError(f"{key} is missing: not a {num_layers}-layer DiT state dict, or already fp8")
            weight = out.pop(key)
            if weight.dim() != 2:
                raise ValueError(f"{key} has shape {tuple(weight.shape)}; expected a (out, in) bf16/fp32 weight")
            absmax = None
            if input_absmax is not None:
                if module not in input_absmax:
                    raise KeyError(f"no calibration absmax for {module}")
                absmax = input_absmax[module]
            if name in PER_TENSOR_LINEARS:
                entries = quantize_per_tensor(weight, absmax)
            else:
                entries = quantize_per_channel(weight, absmax, smooth_alpha)
            out.update({f"{module}.{k}": v for k, v in entries.items()})
    return out


def calibrate_input_absmax(model: nn.Module, run_fn: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Per-input-channel absmax (fp32, shape (in,)) of every linear that fp8 replaces, while `run_fn()` runs.

    Run it on the bf16 model with representative inputs (prompts, timesteps, chunk positions); the maxima
    accumulate over all calls. The hooks are removed afterwards, whatever happens.
    """
    absmax: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        return hook

    names = fp8_module_names(len(model.get_submodule(LAYER_PREFIX)))
    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    try:
        with torch.no_grad():
            run_fn()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in absmax]
    if missing:
        raise RuntimeError(f"run_fn never reached {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return absmax
