"""parallel/zero.py on a GPU: bf16 parameters with fp32 masters under the fused AdamW (apex's when importable,
else torch's fused kernel), and a state round trip whose step counts live where the fused kernel wants them."""

from __future__ import annotations

import pytest
import torch

from magi_train.config.schema import OptimizerConfig
from magi_train.parallel.zero import ShardedAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-5, min_lr=1e-5, warmup_steps=0, decay="constant", weight_decay=0.0)


def test_fused_adamw_keeps_small_updates_in_the_master_and_resumes():
    init = torch.linspace(0.01, 0.03, 4096, device="cuda").to(torch.bfloat16)
    p = torch.nn.Parameter(init.clone())
    opt = ShardedAdamW([("w", p)], _cfg())
    for _ in range(50):
        p.grad = torch.ones_like(p)
        opt.step()
    torch.testing.assert_close(opt.master["w"], init.float() - 50 * 1e-5, rtol=0, atol=1e-6)
    q = torch.nn.Parameter(p.detach().clone())
    again = ShardedAdamW([("w", q)], _cfg())
    again.load_owned_state({k: {n: t.clone() for n, t in v.items()} for k, v in opt.owned_state().items()})
    for o, t in ((opt, p), (again, q)):
        t.grad = torch.ones_like(t)
        o.step()
    assert torch.equal(opt.master["w"], again.master["w"])
