"""Small model assets in the released on-disk formats, built inside tests (no weights can be downloaded):
a T5 encoder directory (sentencepiece tokenizer + T5EncoderModel), a ViT VAE directory (diffusers style) and
released-layout DiT weight directories (inference_weight[.fp8][.distill], sharded with an index)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from magi_train.model.fp8 import quantize_dit_state_dict
from magi_train.model.vae import ViTVAE
from magi_train.checkpoint.magi1 import cast_like_released, save_magi1_checkpoint
from magi_train.config.schema import ModelConfig
from magi_train.model.dit import build_dit

SENTENCES = [
    "a red fox runs through the snow", "waves crash on a rocky shore at sunset", "a cat sleeps on a warm windowsill",
    "city lights flicker in the rain at night", "a small boat drifts across a calm lake",
    "children play football in the park", "the camera slowly pans over green hills",
]

VAE_DDCONFIG = dict(video_size=32, video_length=8, patch_size=8, patch_length=4, in_chans=3, z_chans=16,
                    double_z=True, embed_dim=256, depth=1, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
                    ln_in_attn=True, conv_last_layer=True)


def make_t5(directory: Path, d_model: int) -> Path:
    """A T5 directory laid out like t5-v1_1-xxl (spiece.model tokenizer, encoder weights), `d_model` wide."""
    import sentencepiece
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    spm = directory.with_name(directory.name + "_spm")
    spm.mkdir(parents=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(  # T5 ids: <pad> 0, </s> 1, <unk> 2, no <s>
        sentence_iterator=iter(SENTENCES * 4), model_writer=model, model_type="unigram", vocab_size=60,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (spm / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(spm, extra_ids=0, local_files_only=True)
    tokenizer.save_pretrained(directory)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(directory)
    return directory


def make_vae(directory: Path) -> Path:
    torch.manual_seed(0)
    vae = ViTVAE(VAE_DDCONFIG)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.05)
    vae.save_pretrained(directory)
    return directory


def make_released_dit(model_dir: Path, cfg: ModelConfig, fp8: bool = False, seed: int = 0) -> Path:
    """Random weights written as `<model_dir>/inference_weight[.fp8][.distill]/` (two or more shards + index)."""
    torch.manual_seed(seed)
    model = build_dit(cfg)
    with torch.no_grad():
        model.final_linear.linear.weight.normal_(0, 0.02)  # zero-initialised otherwise: nothing would move
    state = cast_like_released(model.state_dict())
    if fp8:
        state = quantize_dit_state_dict(state, cfg.num_layers)
    name = "inference_weight" + (".fp8" if fp8 else "") + (".distill" if cfg.distill else "")
    total = sum(v.numel() * v.element_size() for v in state.values())
    save_magi1_checkpoint(state, model_dir / name, max_shard_bytes=total // 2)
    return model_dir
