"""The text side of inference: caption cleaning, the T5 encoder wrapper and the per-chunk caption rows.

The golden rows come from the released MAGI-1 pipeline run on the tiny `magi1_gelu` model (model/README.md §4.2); the other
expectations are written out by hand from the released conventions (magi_train/model/README.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from magi_infer.conditioning import CaptionOptions, SpecialTokens, build_caption_rows, duration_index
from magi_train.model.text.t5 import T5TextEncoder
from magi_train.model.text.clean import clean_caption, prepare_prompt

FIXTURES = Path(__file__).parents[1] / "fixtures"
GELU = FIXTURES / "magi1_gelu"
TOKENS_NPZ = FIXTURES / "special_tokens.npz"


def _tensor(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as f:
        return f.get_tensor(key)


@pytest.fixture(scope="module")
def released_tokens() -> SpecialTokens:
    return SpecialTokens.load(TOKENS_NPZ)


# ---------------------------------------------------------------------------------------------------------------
# Golden rows from the released t2v run

def test_rows_reproduce_the_released_t2v_run_bitwise(released_tokens):
    weights = GELU / "inference_weight"
    null = _tensor(weights / "model-00001-of-00002.safetensors", "y_embedder.null_caption_embedding")
    caption_embs = _tensor(GELU / "inputs.safetensors", "caption_embs")  # (1, 1, 62, 4096)
    emb_masks = _tensor(GELU / "inputs.safetensors", "emb_masks")  # (1, 62)
    golden_first_rows = _tensor(GELU / "t2v.safetensors", "t2v.y_cond_first_rows")  # (3 chunks, 3 rows, 4096)
    golden_masks = _tensor(GELU / "t2v.safetensors", "t2v.emb_masks_processed")  # (2, 3, 64)

    y, mask = build_caption_rows(caption_embs[0], emb_masks, special_tokens=released_tokens,
                                 null_caption_embedding=null, infer_chunk_num=3, caption_length=64)

    assert y.shape == (2, 3, 64, 4096) and y.dtype == torch.float32
    assert torch.equal(y[0, :, :3], golden_first_rows)
    assert torch.equal(mask, golden_masks)
    # Beyond the recorded first rows: the rest of each cond row is the T5 output, the null rows the checkpoint's.
    assert torch.equal(y[0, :, 2:], caption_embs[0, 0].expand(3, -1, -1))
    assert torch.equal(y[1], null.float().expand(3, -1, -1))


# ---------------------------------------------------------------------------------------------------------------
# Special tokens

def test_special_tokens_are_rounded_to_fp16_and_named_by_row():
    raw = np.load(TOKENS_NPZ)
    other = raw["other_tokens"]
    tokens = SpecialTokens.load(TOKENS_NPZ)

    def fp16(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a.astype(np.float16).astype(np.float32))

    assert tokens.other.dtype == torch.float32
    assert torch.equal(tokens.other, fp16(other))
    assert not torch.equal(tokens.other, torch.tensor(other, dtype=torch.float32))  # the rounding is real
    assert torch.equal(tokens.caption, fp16(raw["caption_token"][0]))
    assert torch.equal(tokens.logo, fp16(raw["logo_token"][0]))
    named = {"trans": 0, "hq": 1, "static_first_frames": 2, "dynamic_first_frames": 3, "borderness": 4,
             "three_d_model": 15, "two_d_anime": 16}
    for name, row in named.items():
        assert torch.equal(getattr(tokens, name), fp16(other[row])), name
    for k in range(8):
        assert torch.equal(tokens.duration(k), fp16(other[7 + k]))
    with pytest.raises(ValueError, match="0..7"):
        tokens.duration(8)


# ---------------------------------------------------------------------------------------------------------------
# Row building on a small synthetic setup whose token rows are easy to recognise

C, L = 8, 64


def _marker_tokens() -> SpecialTokens:
    """other[i] = i everywhere, caption = -1, logo = -2: every token is identified by its value."""
    other = torch.arange(100, dtype=torch.float32)[:, None].expand(100, C).clone()
    return SpecialTokens(caption=torch.full((C,), -1.0), logo=torch.full((C,), -2.0), other=other)


def _prompts(num: int, tokens: int = L, valid: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt j's features are 1000·(j+1) + position; `valid` leading positions are masked in."""
    pos = torch.arange(tokens, dtype=torch.float32)
    embs = torch.stack([(1000.0 * (j + 1) + pos)[:, None].expand(tokens, C) for j in range(num)])
    masks = torch.zeros(num, tokens, dtype=torch.int64)
    masks[:, :valid] = 1
    return embs, masks


def _null() -> torch.Tensor:
    return torch.randn(L, C, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def _ids(row: torch.Tensor) -> list[float]:
    """Each position's identifying value (all channels are equal for marker tokens and prompts)."""
    return row[:, 0].tolist()


def test_prepend_order_is_the_reverse_of_the_key_order():
    everything = CaptionOptions(static_first_frames=True, dynamic_first_frames=True, borderness=True,
                                three_d_model=True, two_d_anime=True)
    embs, masks = _prompts(1)
    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                                 infer_chunk_num=1, options=everything)
    # [DURATION_0 (other 7), TWO_D_ANIME 16, THREE_D 15, HQ 1, BORDERNESS 4, DYNAMIC 3, STATIC 2, t5_0, ...]
    assert _ids(y[0, 0])[:9] == [7, 16, 15, 1, 4, 3, 2, 1000, 1001]
    assert mask[0, 0, :27].tolist() == [1.0] * 27 and mask[0, 0, 27:].sum() == 0

    y, _ = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                              infer_chunk_num=1)  # released defaults: HQ and DURATION
    assert _ids(y[0, 0])[:3] == [7, 1, 1000]

    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                                 infer_chunk_num=1, options=CaptionOptions(hq=False, duration=False))
    assert torch.equal(y[0, 0], embs[0]) and torch.equal(mask[0, 0], masks[0].float())


def test_duration_token_counts_the_chunks_that_follow_capped_at_7():
    assert [duration_index(i, 5) for i in range(5)] == [4, 3, 2, 1, 0]
    assert [duration_index(i, 10) for i in range(10)] == [7, 7, 7, 6, 5, 4, 3, 2, 1, 0]
    embs, masks = _prompts(1)
    for generated, expected in [(5, [4, 3, 2, 1, 0]), (10, [7, 7, 7, 6, 5, 4, 3, 2, 1, 0])]:
        y, _ = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                                  infer_chunk_num=generated)
        assert y[0, :, 0, 0].tolist() == [7 + k for k in expected]  # DURATION_TOKEN list index k = other[7 + k]


def test_rows_are_cut_to_the_caption_length_after_prepending():
    embs, masks = _prompts(1, tokens=L, valid=L)  # a prompt that fills the whole caption length (T5 at 800)
    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                                 infer_chunk_num=1)
    assert y.shape == (2, 1, L, C)
    assert _ids(y[0, 0]) == [7, 1] + [1000 + p for p in range(L - 2)]  # the last two T5 positions fall off
    assert mask[0, 0].tolist() == [1.0] * L

    long_embs, long_masks = _prompts(1, tokens=800)
    y, mask = build_caption_rows(long_embs, long_masks, special_tokens=_marker_tokens(),
                                 null_caption_embedding=_null(), infer_chunk_num=1)
    assert y.shape == (2, 1, L, C) and mask.shape == (2, 1, L) and mask[0, 0].sum() == 22


def test_null_rows_are_the_null_caption_with_50_valid_positions():
    null = _null()
    embs, masks = _prompts(1)
    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=null,
                                 infer_chunk_num=4)
    assert torch.equal(y[1], null.float().expand(4, L, C))
    assert mask[1].tolist() == [[1.0] * 50 + [0.0] * (L - 50)] * 4


def test_negative_tokens_precede_the_null_caption_and_keep_its_mask():
    null = _null()
    embs, masks = _prompts(1)
    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=null,
                                 infer_chunk_num=2, options=CaptionOptions(negative_tokens=True))
    for chunk in range(2):
        assert _ids(y[1, chunk])[:4] == [4, 0, -2, -1]  # BORDERNESS, TRANS, LOGO, CAPTION
        assert torch.equal(y[1, chunk, 4:], null.float()[: L - 4])
        assert mask[1, chunk].tolist() == [1.0] * 50 + [0.0] * (L - 50)
    assert _ids(y[0, 0])[:3] == [7 + 1, 1, 1000]  # the conditional row is unaffected


def test_a_prompt_mask_of_zeros_makes_both_rows_null():
    null = _null()
    embs, masks = _prompts(1)
    for options in [CaptionOptions(), CaptionOptions(negative_tokens=True)]:
        y, mask = build_caption_rows(embs, torch.zeros_like(masks), special_tokens=_marker_tokens(),
                                     null_caption_embedding=null, infer_chunk_num=3, clean_chunk_num=1,
                                     options=options)
        assert torch.equal(y[0], y[1]) and torch.equal(mask[0], mask[1])
        assert mask[0].sum() == 3 * 50
    assert torch.equal(y[1, :, 4:], null.float()[: L - 4].expand(3, -1, -1))


def test_chunkwise_prompts_land_on_their_chunks_and_the_last_one_repeats():
    embs, masks = _prompts(3)
    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                                 infer_chunk_num=6, clean_chunk_num=1)
    # Chunk 0 is clean; generated chunks 1..5 take prompts 0, 1, 2, 2, 2 (first T5 value 1000·(prompt+1)).
    assert y[0, 1:, 2, 0].tolist() == [1000, 2000, 3000, 3000, 3000]
    assert y[0, 1:, 0, 0].tolist() == [7 + k for k in [4, 3, 2, 1, 0]]  # durations count generated chunks only

    one_embs, one_masks = _prompts(1)
    y, _ = build_caption_rows(one_embs, one_masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                              infer_chunk_num=4)
    assert y[0, :, 2, 0].tolist() == [1000] * 4


def test_a_chunk_with_an_empty_prompt_gets_the_null_row():
    null = _null()
    embs, masks = _prompts(2)
    masks[1] = 0
    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=null,
                                 infer_chunk_num=3)
    assert y[0, 0, 2, 0] == 1000 and mask[0, 0].sum() == 22
    for chunk in (1, 2):
        assert torch.equal(y[0, chunk], y[1, chunk]) and torch.equal(mask[0, chunk], mask[1, chunk])


def test_clean_prefix_chunks_get_the_null_caption_with_an_all_zero_mask():
    null = _null()
    embs, masks = _prompts(1)
    y, mask = build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=null,
                                 infer_chunk_num=4, clean_chunk_num=2)
    for chunk in (0, 1):
        assert torch.equal(y[0, chunk], null.float()) and mask[0, chunk].sum() == 0
        assert mask[1, chunk].sum() == 50  # the null row is the same as for any chunk
    assert y[0, 2:, 0, 0].tolist() == [7 + 1, 7 + 0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt_width=16), "caption_channels"),
        (dict(num_prompts=0), "at least one prompt"),
        (dict(num_prompts=4), "4 prompts given but only 3"),
        (dict(prompt_tokens=40), "short of the caption length 64"),
        (dict(clean=3), "clean_chunk_num < infer_chunk_num"),
        (dict(caption_length=800), "caption_length 800"),
    ],
)
def test_invalid_inputs_are_named(change, message):
    width = change.get("prompt_width", C)
    num = change.get("num_prompts", 1)
    tokens = change.get("prompt_tokens", L)
    embs, masks = torch.zeros(num, tokens, width), torch.ones(num, tokens)
    with pytest.raises(ValueError, match=message):
        build_caption_rows(embs, masks, special_tokens=_marker_tokens(), null_caption_embedding=_null(),
                           infer_chunk_num=3, clean_chunk_num=change.get("clean", 0),
                           caption_length=change.get("caption_length"))


# ---------------------------------------------------------------------------------------------------------------
# Caption cleaning (DeepFloyd-IF rules as released); expected strings written by hand

@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("  A Photo of a CAT  ", "a photo of a cat"),
        ("a+red%20fox", "a red fox"),  # URL-decoded first
        ("<person> walking", "person walking"),
        ("<p>Hello <b>World</b></p>", "hello world"),
        ("fish &amp; chips", "fish chips"),  # entity decoded, then "&" is junk punctuation
        ("follow @john_doe for more", "follow for more"),
        ("a cat 猫 on a mat", "a cat on a mat"),  # CJK ideographs go...
        ("a ねこ cat", "a ねこ cat"),  # ...kana stay
        ("red — blue", "red - blue"),
        ("“Hello”", "hello"),  # curly quotes straightened, then quotes around the caption dropped
        ("it’s a ‘test’", "it's a 'test"),  # a trailing apostrophe is cut
        ("this-is-my-cute-cat", "this is my cute cat"),
        ("a well-known dog", "a well-known dog"),
        ("order 1234567 now", "order now"),
        ("server 192.168.0.1 down", "server down"),
        ("product jc6640 here", "product here"),
        ("wallpaper 1920x1080 hd", "wallpaper hd"),
        ("free shipping worldwide", "worldwide"),
        ("...wow...", "wow"),
        ("see https://example.com/cat.jpg now", "see . now"),
    ],
)
def test_clean_caption(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_prepare_prompt_cleans_twice():
    # The first pass leaves " . " behind after removing the URL; the second pass removes it.
    assert prepare_prompt("see https://example.com/cat.jpg now") == "see now"
    assert prepare_prompt("A Photo of a CAT") == "a photo of a cat"


# ---------------------------------------------------------------------------------------------------------------
# T5 encoder: a tiny real T5 with a real sentencepiece tokenizer, saved like the released t5-v1_1-xxl folder

SENTENCES = [
    "a red fox jumps over the lazy dog",
    "a cat sits on a warm mat in the sun",
    "waves crash on the rocky shore at dusk",
    "the city lights shimmer at night",
    "children play football in the park",
]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    import io

    import sentencepiece
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    root = tmp_path_factory.mktemp("t5")
    spm_dir, t5_dir = root / "spm", root / "t5"
    spm_dir.mkdir()
    model_bytes = io.BytesIO()
    # T5's id convention: <pad> 0, </s> 1, <unk> 2, no <s>.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=model_bytes, model_type="unigram", vocab_size=60,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    (spm_dir / "spiece.model").write_bytes(model_bytes.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(spm_dir, extra_ids=0, local_files_only=True)
    tokenizer.save_pretrained(t5_dir)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(t5_dir)
    return t5_dir


def test_t5_encoder_outputs_padded_fp32_features_and_the_tokenizer_mask(tiny_t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    prompts = ["A red FOX jumps!", "the cat at dusk"]
    encoder = T5TextEncoder(tiny_t5_dir, max_length=24)
    emb, mask = encoder.encode(prompts)

    assert emb.shape == (2, 24, 16) and emb.dtype == torch.float32 and mask.shape == (2, 24)
    # Independent tokenisation: the cleaned prompt, padded to max_length, EOS appended.
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir, local_files_only=True)
    expected = tokenizer([prepare_prompt(p) for p in prompts], max_length=24, padding="max_length",
                         truncation=True, return_tensors="pt")
    assert torch.equal(mask, expected["attention_mask"])
    lengths = mask.sum(dim=1)
    assert (lengths < 24).all()  # there is padding to look at
    for b in range(2):
        assert expected["input_ids"][b, lengths[b] - 1] == tokenizer.eos_token_id
    model = T5EncoderModel.from_pretrained(tiny_t5_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        reference = model(**expected).last_hidden_state
    assert torch.equal(emb, reference)
    padded = mask == 0
    assert (emb[padded].abs().sum(dim=-1) > 0).all()  # padded positions are kept, not zeroed

    again, _ = encoder.encode(prompts[:1])  # the same loaded model serves another request
    assert torch.equal(again[0], emb[0])


def test_t5_encoder_truncates_long_prompts_and_keeps_eos(tiny_t5_dir):
    encoder = T5TextEncoder(tiny_t5_dir, max_length=8)
    emb, mask = encoder.encode([" ".join(SENTENCES)])
    ids = encoder.tokenize([" ".join(SENTENCES)])["input_ids"]
    assert emb.shape == (1, 8, 16) and mask.sum() == 8
    assert ids[0, -1] == encoder.tokenizer.eos_token_id


def test_token_counts_are_the_lengths_before_the_cut(tiny_t5_dir):
    from magi_train.model.text.hash import HashTextEncoder

    encoder = T5TextEncoder(tiny_t5_dir, max_length=8)
    long, short = " ".join(SENTENCES), "a cat"
    counts = encoder.token_counts([long, short])
    untruncated = T5TextEncoder(tiny_t5_dir, max_length=400)
    assert counts == [int(m.sum()) for m in untruncated.encode([long, short])[1]]
    assert counts[0] > 8 and counts[1] < 8
    _, mask = encoder.encode([long])
    assert mask.sum() == 8  # the embedding still holds the first max_length tokens

    words = HashTextEncoder(dim=4, max_length=3)
    assert words.token_counts(["a red fox runs", "!!!", ""]) == [4, 0, 0]
    assert words.encode(["a red fox runs"])[1].sum() == 3


def test_t5_encoder_accepts_the_released_parent_layout(tiny_t5_dir, tmp_path):
    parent = tmp_path / "t5_pretrained"
    shutil.copytree(tiny_t5_dir, parent / "t5-v1_1-xxl")
    encoder = T5TextEncoder(parent, max_length=16)
    assert encoder.path == parent / "t5-v1_1-xxl"
    direct, _ = T5TextEncoder(tiny_t5_dir, max_length=16).encode(["a cat"])
    nested, _ = encoder.encode(["a cat"])
    assert torch.equal(direct, nested)


def test_t5_encoder_names_a_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        T5TextEncoder(missing)
