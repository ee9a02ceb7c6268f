"""The released MAGI-1 ViT VAE (model/README.md §5): state-dict layout, numerics, directory format, tiling and the codec.

Expected values come from formulas written here (the released layout, an independent functional forward, the
half-pixel trilinear weights, a per-pixel ramp), not from the code under test.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from itertools import count
from typing import Dict, List, Tuple

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from einops import rearrange

from magi_train.model.vae import VaeCodec, ViTVAE, qkv_norm, tiled_decode, tiled_encode

# Tiny config with the released factors (8x spatial, 4x temporal, 16 latent channels). embed_dim must be a
# multiple of patch_length * patch_size^2 = 256 (one unpatch channel here, 4 in the released model).
TINY = dict(video_size=32, video_length=8, patch_size=8, patch_length=4, z_chans=16, embed_dim=256, depth=1,
            num_heads=4, mlp_ratio=2.0, qkv_bias=True, ln_in_attn=True, conv_last_layer=True)
HEADS, D, Z = 4, 256, 16


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, centre = (0.1, 1.0 if name.endswith("weight") else 0.0) if "norm" in name else (0.3, 0.0)
            p.copy_(torch.randn(p.shape, generator=g) * scale + centre)
    return model.eval()


@pytest.fixture(scope="module")
def vae() -> ViTVAE:
    return _randomise(ViTVAE(TINY), seed=0)


def _video(shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ state dict


def expected_layout(D: int, depth: int, z: int, pT: int, p: int, n_ref: int, mlp: int, ln_in_attn: bool,
                    qkv_bias: bool, final_proj: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of the released ViTVAE (model/README.md §5.1), written from the released module structure."""
    def block(prefix: str) -> Dict[str, Tuple[int, ...]]:
        keys = {f"{prefix}.attn.qkv.weight": (3 * D, D), f"{prefix}.attn.proj.weight": (D, D),
                f"{prefix}.attn.proj.bias": (D,), f"{prefix}.norm2.weight": (D,), f"{prefix}.norm2.bias": (D,),
                f"{prefix}.mlp.fc1.weight": (mlp, D), f"{prefix}.mlp.fc1.bias": (mlp,),
                f"{prefix}.mlp.fc2.weight": (D, mlp), f"{prefix}.mlp.fc2.bias": (D,)}
        if qkv_bias:
            keys[f"{prefix}.attn.qkv.bias"] = (3 * D,)
        if not ln_in_attn:
            keys.update({f"{prefix}.norm1.weight": (D,), f"{prefix}.norm1.bias": (D,)})
        return keys

    out: Dict[str, Tuple[int, ...]] = {}
    for side in ("encoder", "decoder"):
        out.update({f"{side}.cls_token": (1, 1, D), f"{side}.pos_embed": (1, 1 + n_ref, D),
                    f"{side}.norm.weight": (D,), f"{side}.norm.bias": (D,)})
        for i in range(depth):
            out.update(block(f"{side}.blocks.{i}"))
    unpatch = 4 if final_proj else D // (pT * p * p)
    out.update({"encoder.patch_embed.proj.weight": (D, 3, pT, p, p), "encoder.patch_embed.proj.bias": (D,),
                "encoder.last_layer.weight": (2 * z, D), "encoder.last_layer.bias": (2 * z,),
                "decoder.proj_in.weight": (D, z), "decoder.proj_in.bias": (D,),
                "decoder.last_layer.weight": (3, unpatch, 3, 3, 3), "decoder.last_layer.bias": (3,)})
    if final_proj:
        n = unpatch * pT * p * p
        out.update({"decoder.final_proj.weight": (n, D), "decoder.final_proj.bias": (n,),
                    "decoder.final_norm.weight": (n,), "decoder.final_norm.bias": (n,)})
    return out


def _layout(model: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_released_size_layout_matches_spec():
    # The released VAE per model/README.md §5.1: D 1024, 24 blocks, z 16, 4x8x8 patches, 16 frames x 256^2 reference.
    ddconfig = dict(video_size=256, video_length=16, patch_size=8, patch_length=4, z_chans=16, embed_dim=1024,
                    depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True, ln_in_attn=True, conv_last_layer=True)
    with torch.device("meta"):
        model = ViTVAE(ddconfig)
    layout = _layout(model)
    assert layout == expected_layout(1024, 24, 16, 4, 8, 4096, 4096, ln_in_attn=True, qkv_bias=True)
    assert layout["encoder.pos_embed"] == (1, 4097, 1024)
    assert layout["decoder.last_layer.weight"] == (3, 4, 3, 3, 3)


@pytest.mark.parametrize("flags", [dict(), dict(ln_in_attn=False, qkv_bias=False), dict(use_final_proj=True)])
def test_tiny_layout_matches_spec(flags):
    with torch.device("meta"):
        model = ViTVAE({**TINY, **flags})
    cfg = {**TINY, **flags}
    assert _layout(model) == expected_layout(D, 1, Z, 4, 8, 2 * 4 * 4, 2 * D, ln_in_attn=cfg["ln_in_attn"],
                                             qkv_bias=cfg["qkv_bias"], final_proj=bool(flags.get("use_final_proj")))


@pytest.mark.parametrize("field, value", [("use_rope", True), ("conv_last_layer", False), ("with_cls_token", False),
                                          ("attn_drop_rate", 0.1), ("double_z", False), ("num_heads", 3),
                                          ("bogus_field", 1), ("patch_length", None)])
def test_unsupported_ddconfig_names_the_field(field, value):
    ddconfig = {**TINY, field: value}
    if value is None:
        del ddconfig[field]
    with pytest.raises(ValueError, match=field):
        ViTVAE(ddconfig)


# ------------------------------------------------------------------------------------------ numerics


def test_qkv_norm_adds_eps_to_the_std():
    u = torch.randn(2, 5, 3, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    u = u * torch.tensor([1.0, 1e-4], dtype=torch.float64).view(2, 1, 1, 1, 1)
    mean = u.mean(-1, keepdim=True)
    std_biased = ((u - mean) ** 2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(qkv_norm(u), (u - mean) / (std_biased + 1e-5), rtol=1e-12, atol=1e-12)
    # Not a LayerNorm (eps inside the sqrt): at small variance the two are far apart.
    assert not torch.allclose(qkv_norm(u[1]), F.layer_norm(u[1], (64,), eps=1e-5), rtol=0.1, atol=0.1)


def half_pixel_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Linear interpolation weights (n_out, n_in) of align_corners=False resizing: source coordinate
    (d + 0.5) * n_in / n_out - 0.5, clamped below at 0, neighbours clamped at the edge."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[d, i0] += 1 - frac
        m[d, i1] += frac
    return m


def resized_table(table: torch.Tensor, src: Tuple[int, int, int], dst: Tuple[int, int, int]) -> torch.Tensor:
    grid = table.double().reshape(*src, -1)
    mt, mh, mw = (half_pixel_matrix(a, b) for a, b in zip(src, dst))
    return torch.einsum("at,bh,cw,thwd->abcd", mt, mh, mw, grid).reshape(1, -1, table.shape[-1])


def test_pos_embed_resize_is_half_pixel_trilinear(vae):
    table = vae.encoder.pos_embed.detach()
    for dst in [(3, 5, 6), (1, 2, 8), (2, 4, 4)]:
        got = vae.encoder.positions(dst)
        assert got.shape == (1, 1 + dst[0] * dst[1] * dst[2], D)
        torch.testing.assert_close(got[:, :1], table[:, :1], rtol=0, atol=0)  # the cls row is never resized
        want = resized_table(table[:, 1:], (2, 4, 4), dst).float()
        torch.testing.assert_close(got[:, 1:], want, rtol=1e-5, atol=1e-6)
        # ... and it is the plain torch trilinear call
        direct = F.interpolate(table[0, 1:].reshape(2, 4, 4, D).permute(3, 0, 1, 2)[None], size=dst,
                               mode="trilinear", align_corners=False)[0].permute(1, 2, 3, 0).reshape(1, -1, D)
        assert torch.equal(got[:, 1:], direct)


def _ref_trunk(sd: Dict[str, torch.Tensor], side: str, tokens: torch.Tensor, grid: Tuple[int, ...]) -> torch.Tensor:
    """Independent functional forward of cls + positions + blocks + final norm (model/README.md §5.1)."""
    table = sd[f"{side}.pos_embed"]
    pos = table[:, 1:] if grid == (2, 4, 4) else resized_table(table[:, 1:], (2, 4, 4), grid).float()
    x = torch.cat([sd[f"{side}.cls_token"].expand(tokens.shape[0], -1, -1), tokens], 1)
    x = x + torch.cat([table[:, :1], pos], 1)
    B, N, _ = x.shape
    for i in range(TINY["depth"]):
        b = f"{side}.blocks.{i}."
        qkv = F.linear(x, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).view(B, N, 3, HEADS, D // HEADS)
        mu = qkv.mean(-1, keepdim=True)
        qkv = (qkv - mu) / (((qkv - mu) ** 2).mean(-1, keepdim=True).sqrt() + 1e-5)
        q, k, v = qkv.unbind(2)
        att = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(D // HEADS), dim=-1)
        o = torch.einsum("bhnm,bmhd->bnhd", att, v).reshape(B, N, D)
        x = x + F.linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-5)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (D,), sd[f"{side}.norm.weight"], sd[f"{side}.norm.bias"], 1e-5)[:, 1:]


@pytest.mark.parametrize("shape", [(8, 32, 32), (12, 40, 24)])
def test_encode_decode_match_an_independent_forward(vae, shape):
    sd = {k: v.detach() for k, v in vae.state_dict().items()}
    x = _video((1, 3, *shape), seed=1)
    grid = (shape[0] // 4, shape[1] // 8, shape[2] // 8)
    tokens = rearrange(F.conv3d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"],
                                stride=(4, 8, 8)), "b d t h w -> b (t h w) d")
    moments = F.linear(_ref_trunk(sd, "encoder", tokens, grid), sd["encoder.last_layer.weight"],
                       sd["encoder.last_layer.bias"])
    mean = rearrange(moments[..., :Z], "b (t h w) c -> b c t h w", t=grid[0], h=grid[1])
    latent = vae.encode(x)
    torch.testing.assert_close(latent, mean, rtol=1e-4, atol=1e-4)

    x = _ref_trunk(sd, "decoder", F.linear(rearrange(latent, "b c t h w -> b (t h w) c"), sd["decoder.proj_in.weight"],
                                           sd["decoder.proj_in.bias"]), grid)
    x = rearrange(x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=grid[0], h=grid[1], pt=4, ph=8, pw=8)
    pixels = F.conv3d(x, sd["decoder.last_layer.weight"], sd["decoder.last_layer.bias"], padding=1)
    torch.testing.assert_close(vae.decode(latent), pixels, rtol=1e-4, atol=1e-4)


def test_single_frame_cases(vae):
    frame = _video((1, 3, 1, 32, 40), seed=2)
    assert torch.equal(vae.encode(frame), vae.encode(frame.repeat(1, 1, 4, 1, 1)))  # one latent frame
    z = torch.randn(1, Z, 1, 4, 5, generator=torch.Generator().manual_seed(3))
    out = vae.decode(z)
    assert out.shape == (1, 3, 1, 32, 40)
    assert torch.equal(out, vae.decoder(z)[:, :, :1])  # the first of the four decoded frames


# ------------------------------------------------------------------------------------------ directory format


def test_save_load_round_trip_is_bitwise(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "ViTVAE" and config["model_type"] == "vit"
    assert {k: config["ddconfig"][k] for k in TINY} == TINY
    loaded = ViTVAE.from_pretrained(tmp_path / "vae")
    assert loaded.state_dict().keys() == vae.state_dict().keys()
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _video((1, 3, 8, 32, 32), seed=4)
    assert torch.equal(loaded.encode(x), vae.encode(x))


def test_load_errors_name_the_problem(vae, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ViTVAE.from_pretrained(tmp_path / "nowhere")
    d = tmp_path / "vae"
    vae.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())

    (d / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name.*AutoencoderKL"):
        ViTVAE.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**config, "ddconfig": {**config["ddconfig"], "use_rope": True}}))
    with pytest.raises(ValueError, match="use_rope"):
        ViTVAE.from_pretrained(d)
    (d / "config.json").write_text(json.dumps(config))

    weights = d / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    broken = {k: v for k, v in state.items() if k != "decoder.proj_in.bias"}
    broken["decoder.extra.weight"] = torch.zeros(1)
    broken["encoder.cls_token"] = torch.zeros(1, 2, D)
    safetensors.torch.save_file(broken, str(weights))
    with pytest.raises(ValueError) as err:
        ViTVAE.from_pretrained(d)
    for name in ("diffusion_pytorch_model.safetensors", "decoder.proj_in.bias", "decoder.extra.weight",
                 "encoder.cls_token"):
        assert name in str(err.value)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        ViTVAE.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ViTVAE.from_pretrained(d)


# ------------------------------------------------------------------------------------------ tiling


def test_one_tile_equals_the_untiled_path(vae):
    x = _video((1, 3, 8, 40, 48), seed=5)  # one 8-frame tile, 40 and 48 <= the 48-px stride of 64-px tiles
    tiled = tiled_encode(vae.encode, x, spatial_factor=8, temporal_factor=4, tile_length=8, tile_px=64)
    assert torch.equal(tiled, vae.encode(x))
    z = torch.randn(1, Z, 3, 6, 5, generator=torch.Generator().manual_seed(6))
    tiled = tiled_decode(vae.decode, z, spatial_factor=8, temporal_factor=4, tile_length=12, tile_px=64)
    assert torch.equal(tiled, vae.decode(z))


def _constant_tiles(channels: int, time_map, space: int):
    """A stand-in coder whose k-th call (tiles are coded t-major, then rows, then columns) returns the constant
    value k + 1, so every output value tells which tiles it was blended from."""
    calls = count()

    def code(tile: torch.Tensor) -> torch.Tensor:
        t, h, w = tile.shape[2:]
        shape = (tile.shape[0], channels, time_map(t), int(h * space), int(w * space))
        return torch.full(shape, float(next(calls) + 1), dtype=torch.float64)

    return code, calls


def expected_plane(values: List[List[float]], sizes_h: List[int], sizes_w: List[int], ramp: int, keep: int,
                   ramp_from_blended: bool) -> torch.Tensor:
    """Per output element: the owning tile's value, faded in over the first `ramp` rows from the tile above and
    then over the first `ramp` columns from the tile on the left (linear weight k / ramp), where each neighbour
    is taken raw (decode) or already blended (encode); ramps shrink to the smaller of two short tiles."""
    @lru_cache(maxsize=None)
    def at(i: int, j: int, y: int, x: int) -> float:
        v = values[i][j]
        if i > 0:
            e = min(ramp, sizes_h[i - 1], sizes_h[i])
            if y < e:
                above = at(i - 1, j, sizes_h[i - 1] - e + y, x) if ramp_from_blended else values[i - 1][j]
                v = above * (1 - y / e) + v * (y / e)
        if j > 0:
            e = min(ramp, sizes_w[j - 1], sizes_w[j])
            if x < e:
                left = at(i, j - 1, y, sizes_w[j - 1] - e + x) if ramp_from_blended else values[i][j - 1]
                v = left * (1 - x / e) + v * (x / e)
        return v

    rows = [(i, y) for i, s in enumerate(sizes_h) for y in range(min(s, keep))]
    cols = [(j, x) for j, s in enumerate(sizes_w) for x in range(min(s, keep))]
    return torch.tensor([[at(i, j, y, x) for j, x in cols] for i, y in rows], dtype=torch.float64)


def test_decode_blends_raw_neighbours_with_a_linear_ramp():
    # Latent 4 x 7 x 10, 12-frame / 32-px tiles: latent tiles 3 x 4 x 4 at stride 3 x 3 x 3 -> 2 x 3 x 4 tiles;
    # pixel tiles 32 px (8 px for the one-latent border tiles), ramp 8 px, keep 24 px.
    code, calls = _constant_tiles(3, lambda t: 1 if t == 1 else 4 * t, 8)
    out = tiled_decode(code, torch.zeros(1, Z, 4, 7, 10), spatial_factor=8, temporal_factor=4, tile_length=12,
                       tile_px=32)
    assert next(calls) == 24
    assert out.shape == (1, 3, 13, 56, 80)  # 12 frames + 1 frame from the one-latent tail
    for f, frames in [(0, range(0, 12)), (1, range(12, 13))]:
        values = [[12 * f + 4 * i + j + 1.0 for j in range(4)] for i in range(3)]
        want = expected_plane(values, [32, 32, 8], [32, 32, 32, 8], ramp=8, keep=24, ramp_from_blended=False)
        for t in frames:
            for c in range(3):
                assert torch.equal(out[0, c, t], want), (f, t, c)


def test_encode_blends_already_blended_neighbours():
    # Pixels 20 x 112 x 160, 8-frame / 64-px tiles: stride 8 x 48 x 48 -> 3 x 3 x 4 tiles; latent tiles 8
    # (2 at the border), ramp 2, keep 6. Frames 16..19 form a 4-frame tile -> one latent.
    code, calls = _constant_tiles(Z, lambda t: 1 if t == 1 else t // 4, 1 / 8)
    out = tiled_encode(code, torch.zeros(1, 3, 20, 112, 160), spatial_factor=8, temporal_factor=4, tile_length=8,
                       tile_px=64)
    assert next(calls) == 36
    assert out.shape == (1, Z, 5, 14, 20)
    for f, frames in [(0, (0, 1)), (1, (2, 3)), (2, (4,))]:
        values = [[12 * f + 4 * i + j + 1.0 for j in range(4)] for i in range(3)]
        want = expected_plane(values, [8, 8, 2], [8, 8, 8, 2], ramp=2, keep=6, ramp_from_blended=True)
        raw = expected_plane(values, [8, 8, 2], [8, 8, 8, 2], ramp=2, keep=6, ramp_from_blended=False)
        assert not torch.equal(want, raw)  # the constructed case tells the two rules apart
        for t in frames:
            assert torch.equal(out[0, 0, t], want), (f, t)


# ------------------------------------------------------------------------------------------ codec


def _frames(T: int, H: int, W: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (T, H, W, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_codec_scaling_and_uint8_conversion(vae):
    codec = VaeCodec(vae, fps=24, tile_px=64)  # one tile: 8 frames <= 12, 40 x 48 <= the 48-px stride
    frames = _frames(8, 40, 48, seed=7)
    latent = codec.encode_frames(frames)
    pixels = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    assert latent.dtype == torch.float32
    assert torch.equal(latent, vae.encode(pixels) * 0.18215)
    decoded = vae.decode(latent / 0.18215)
    want = (decoded * 127.5 + 127.5).clamp(0, 255).floor().to(torch.uint8)[0].permute(1, 2, 3, 0)
    assert torch.equal(codec.decode_latents(latent), want)


def test_uint8_cast_truncates():
    model = ViTVAE(TINY).eval()
    with torch.no_grad():  # a decoder whose output is a constant per channel
        model.decoder.last_layer.weight.zero_()
        model.decoder.last_layer.bias.copy_(torch.tensor([(100.7 - 127.5) / 127.5, -2.0, 3.0]))
    frames = VaeCodec(model, tile_px=32).decode_latents(torch.zeros(1, Z, 2, 3, 5))
    assert frames.shape == (8, 24, 40, 3) and frames.dtype == torch.uint8
    assert frames.reshape(-1, 3).unique(dim=0).tolist() == [[100, 0, 255]]  # 100.7 -> 100, clamped at both ends


def test_codec_frame_counts_and_border_tiles(vae):
    codec = VaeCodec(vae, fps=24, tile_px=32)  # 12-frame tiles = 3 latents, 32-px tiles
    g = torch.Generator().manual_seed(14)
    # 4 latents -> tiles of 3 + 1 -> 12 + 1 frames (model/README.md §5.3 corner case); 40 x 56 px is not a tile multiple.
    assert codec.decode_latents(torch.randn(1, Z, 4, 5, 7, generator=g)).shape == (13, 40, 56, 3)
    assert codec.decode_latents(torch.randn(1, Z, 5, 5, 7, generator=g)).shape == (20, 40, 56, 3)
    assert codec.decode_latents(torch.randn(1, Z, 1, 5, 7, generator=g)).shape == (1, 40, 56, 3)
    # 13 frames -> 12 + 1 -> 3 + 1 latents; 20 frames -> 12 + 8 -> 3 + 2 latents.
    assert codec.encode_frames(_frames(13, 40, 56, seed=8)).shape == (1, Z, 4, 5, 7)
    assert codec.encode_frames(_frames(20, 40, 56, seed=9)).shape == (1, Z, 5, 5, 7)
    with pytest.raises(ValueError, match="2 frames"):
        codec.encode_frames(_frames(14, 40, 56, seed=10))
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode_frames(_frames(4, 36, 56, seed=11))


def test_single_frame_encodes_like_four_repeats(vae):
    codec = VaeCodec(vae, tile_px=32)
    frame = _frames(1, 40, 56, seed=12)
    single = codec.encode_frames(frame)
    assert single.shape == (1, Z, 1, 5, 7)
    assert torch.equal(single, codec.encode_frames(frame.repeat(4, 1, 1, 1))[:, :, :1])
