"""Our DiT reproduces the released MAGI-1 model: a tiny 4.5B-shaped checkpoint in the released layout, run by the
official inference code (tests/fixtures/magi1_gelu, see /work/shared/conformance/README.md).

Tolerance (README): an exact implementation with other kernels is within ~1e-2 max relative of the goldens (the
released code computes in bf16); real convention mistakes move the output by 0.35-1.5 relative. The tests also
check that the comparison is sharp: known wrong conventions are detected.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from einops import rearrange

from magi_train.checkpoint.magi1 import load_magi1_state_dict
from magi_train.config.released import load_released_config
from magi_train.model import dit as layers_mod
from magi_train.model.attention import AttnRanges
from magi_train.model.dit import build_dit
from magi_train.model.norms import LayerNorm1p

GELU = Path(__file__).resolve().parents[1] / "fixtures" / "magi1_gelu"
TOLERANCE = 1e-2  # README: exact implementation, other kernels
WRONG = 0.1  # anything a real convention mistake does is well above this


def rel_err(out: torch.Tensor, golden: torch.Tensor) -> float:
    return ((out - golden).abs().max() / golden.abs().max()).item()


@pytest.fixture(scope="module")
def inputs():
    return safetensors.torch.load_file(GELU / "inputs.safetensors")


@pytest.fixture(scope="module")
def goldens():
    return safetensors.torch.load_file(GELU / "forward.safetensors")


@pytest.fixture(scope="module")
def released_model(single_process_group):
    model = build_dit(load_released_config(GELU / "config.json"), tp_group=single_process_group)
    model.load_state_dict(load_magi1_state_dict(GELU / "inference_weight"), strict=True)
    model.eval()
    return model


def run(model, inputs, uncond: bool, self_ranges=None) -> torch.Tensor:
    if self_ranges is None:
        # 2 chunks of 144 tokens; kv_range = [[0,144],[0,288]] (block-causal, no cache)
        self_ranges = AttnRanges(torch.tensor([[0, 144], [144, 288]]), inputs["fwd.kv_range"].long())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the README's tolerances were measured with one thread
    try:
        with torch.no_grad():
            return model(
                inputs["fwd.x"],
                inputs["fwd.t"],
                inputs["fwd.y"].squeeze(1),
                inputs["fwd.xattn_mask"].squeeze(1),
                self_ranges,
                adaln_uncond=torch.tensor([uncond]),
            )
    finally:
        torch.set_num_threads(threads)


def test_fixture_inputs_are_what_the_readme_describes(inputs, goldens):
    assert inputs["fwd.x"].shape == (1, 16, 12, 8, 12)
    assert inputs["fwd.kv_range"].tolist() == [[0, 144], [0, 288]]
    assert inputs["fwd.xattn_mask"].squeeze(1).sum(-1).tolist() == [22, 13]
    assert goldens["out_forward"].shape == goldens["out_forward_uncond_adaln"].shape == (1, 16, 12, 8, 12)


@pytest.mark.parametrize("uncond,key,other", [(False, "out_forward", "out_forward_uncond_adaln"),
                                              (True, "out_forward_uncond_adaln", "out_forward")])
def test_forward_matches_released_model(released_model, inputs, goldens, uncond, key, other):
    out = run(released_model, inputs, uncond)
    assert out.shape == goldens[key].shape and out.dtype == torch.float32
    err = rel_err(out, goldens[key])
    assert err <= TOLERANCE, f"{key}: max rel err {err:.3e}"
    # the adaLN row matters: the other golden is far away
    assert rel_err(out, goldens[other]) > WRONG


def test_forward_is_deterministic(released_model, inputs):
    a = run(released_model, inputs, False)
    b = run(released_model, inputs, False)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ the comparison detects wrong conventions


def interleaved_rotary(x, sin, cos):
    """GPT-J style (pairs 2i, 2i+1) instead of rotate-half."""
    rot = 2 * sin.shape[-1]
    pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    s, c = sin[:, None, :], cos[:, None, :]
    out = torch.stack([a * c - b * s, b * c + a * s], dim=-1).reshape(*x.shape[:-1], rot)
    return torch.cat([out, x[..., rot:]], dim=-1)


def no_interleave_rearrange(tensor, pattern, **axes):
    if pattern == "s n (two g d) -> s n (g two d)":
        return tensor  # [all self | all cross] straight into linear_proj
    return rearrange(tensor, pattern, **axes)


def gate_after_norm(branch, residual, gate, condition_map, post_norm):
    token_gate = gate.float().flatten(0, 1)[condition_map]
    return (post_norm(branch.float()) * token_gate + residual.float()).to(branch.dtype)


def plain_norm_forward(self, x):  # forget the +1 of the zero-centred gamma
    return torch.nn.functional.layer_norm(x, self.size, self.weight, self.bias, self.eps)


WRONG_VARIANTS = {
    "interleaved rotary": ("apply_rotary", interleaved_rotary),
    "no 8-group [self|cross] interleave": ("rearrange", no_interleave_rearrange),
    "gate after the post-norm": ("modulate_add", gate_after_norm),
}


@pytest.mark.parametrize("variant", sorted(WRONG_VARIANTS))
def test_wrong_convention_is_detected(released_model, inputs, goldens, monkeypatch, variant):
    attr, fn = WRONG_VARIANTS[variant]
    monkeypatch.setattr(layers_mod, attr, fn)
    err = rel_err(run(released_model, inputs, False), goldens["out_forward"])
    assert err > WRONG, f"{variant}: rel err only {err:.3e}"


def test_missing_layernorm_1p_is_detected(released_model, inputs, goldens, monkeypatch):
    monkeypatch.setattr(LayerNorm1p, "forward", plain_norm_forward)
    assert rel_err(run(released_model, inputs, False), goldens["out_forward"]) > WRONG


def test_ignoring_kv_ranges_is_detected(released_model, inputs, goldens):
    full = AttnRanges(torch.tensor([[0, 288]]), torch.tensor([[0, 288]]))
    assert rel_err(run(released_model, inputs, False, self_ranges=full), goldens["out_forward"]) > WRONG
