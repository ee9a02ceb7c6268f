"""A packed sequence of samples of different sizes gives each sample the output of its own dense forward."""

import torch

from magi_train.data.packed_inputs import PackedItem, pack_inputs, patchify
from magi_train.model.attention import block_causal_ranges, caption_ranges, row_block_causal_ranges
from magi_train.model.dit import build_dit
from tests.distributed.common import tiny


def _item(g, C, T, H, W, chunks, L, Cc, dropped=False):
    lengths = torch.randint(2, L + 1, (chunks,), generator=g)
    return PackedItem(
        x_t=torch.randn(C, T, H, W, generator=g), target=torch.randn(C, T, H, W, generator=g),
        frame_weight=torch.ones(T), t=torch.rand(chunks, generator=g).sort(descending=True).values,
        caption=torch.randn(chunks, L, Cc, generator=g), caption_mask=torch.arange(L)[None] < lengths[:, None],
        null_rows=torch.zeros(chunks, dtype=torch.bool), adaln_uncond=torch.full((chunks,), dropped))


def test_packed_sequence_equals_dense_forward_per_sample(single_process_group):
    cfg = tiny(gated_linear_unit=True)
    model = build_dit(cfg, tp_group=single_process_group, init_seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.final_linear.linear.weight.normal_(0, 0.05, generator=g)
    cw = cfg.chunk_width
    items = [_item(g, cfg.in_channels, 2 * cw, 8, 8, 2, 12, cfg.caption_channels),
             _item(g, cfg.in_channels, cw, 4, 8, 1, 12, cfg.caption_channels, dropped=True),
             _item(g, cfg.in_channels, 1, 8, 4, 1, 12, cfg.caption_channels)]  # an image: one frame
    seq, rows = 256, 6
    inputs, target = pack_inputs(items, cfg, seq, rows)
    patches, t, caption, mask, null_rows, adaln, coords, token_map = inputs
    ranges = row_block_causal_ranges(token_map)
    placement = model.place(ranges, 1, seq)
    stream = model.embed_packed(patches, t, caption, mask, adaln, coords, token_map, placement=placement)
    packed = model.head_tokens(model.run_layers(stream, placement).h, placement).detach()  # (1, P, S)
    assert packed.shape == (1, patches.shape[-1], seq)

    pos = 0
    for item in items:
        C, T, H, W = item.x_t.shape
        chunks = item.t.shape[0]
        dense = model(item.x_t[None], item.t[None], item.caption, item.caption_mask,
                      block_causal_ranges(1, chunks, T // chunks * H * W // 4), adaln_uncond=item.adaln_uncond[None])
        expected = patchify(dense[0], cfg.t_patch_size, cfg.patch_size)
        n = expected.shape[0]
        got = packed[0, :, pos:pos + n].t()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()))
        pos += n
    # Loss weights: every real token 1, padding 0.
    assert target.shape == (1, patches.shape[-1] + 1, seq)
    assert torch.equal(target[0, -1, :pos], torch.ones(pos)) and not target[0, -1, pos:].any()


def test_row_block_causal_ranges_match_dense_ranges():
    rows = torch.arange(6).repeat_interleave(4).reshape(2, 12)  # 2 samples x 3 chunks x 4 tokens
    samples = torch.arange(2)[:, None].expand(2, 12)
    token_map = torch.stack([rows, samples], -1).float()
    assert row_block_causal_ranges(token_map).pairs() == block_causal_ranges(2, 3, 4).pairs()


def test_caption_ranges_follow_row_runs():
    rows = torch.tensor([0, 0, 1, 1, 1, -1, 2, 0])
    r = caption_ranges(rows, [3, 0, 2])
    assert r.pairs() == [(0, 2, 0, 3), (6, 7, 3, 5), (7, 8, 0, 3)]


def test_position_weight_is_the_patch_mean_times_the_frame_weight():
    cfg = tiny()
    g = torch.Generator().manual_seed(3)
    C, T, H, W = cfg.in_channels, cfg.chunk_width, 4, 4
    item = _item(g, C, T, H, W, 1, 6, cfg.caption_channels)
    item.frame_weight = torch.ones(T)
    item.frame_weight[0] = 0.0  # an i2v frame: no loss whatever its motion
    position = 1.0 + torch.rand(T, H, W, generator=g)
    plain_inputs, plain = pack_inputs([item], cfg, 64, 2, weight_scale=0.5)
    item.position_weight = position
    inputs, weighted = pack_inputs([item], cfg, 64, 2, weight_scale=0.5)
    # Only the weight channel changes; each token weighs its 2x2 patch's mean position weight.
    assert torch.equal(weighted[0, :-1], plain[0, :-1]) and all(torch.equal(a, b) for a, b in zip(inputs, plain_inputs))
    n = T * H * W // 4
    patch_mean = position.reshape(T, H // 2, 2, W // 2, 2).mean(dim=(2, 4)).reshape(n)
    expected = patch_mean * item.frame_weight.repeat_interleave(n // T) * 0.5
    torch.testing.assert_close(weighted[0, -1, :n], expected, rtol=1e-6, atol=0)
    assert torch.equal(plain[0, -1, :n], item.frame_weight.repeat_interleave(n // T) * 0.5)
    assert not weighted[0, -1, n:].any()
