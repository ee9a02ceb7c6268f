"""`trainer.compile`: each transformer layer compiled on its own (magi_train/model/compile.py), wired into
`build_train_stages`.

The numerics test compiles with dynamo + AOTAutograd (backend "aot_eager"), not inductor: inductor's C++ code
generation compiles a one-layer DiT in about a minute on this 2-core CPU, too long for a unit test, while
aot_eager exercises the same capture (graph breaks at the attention slots, the autograd graph, the dynamic
caption dimension) in seconds. Inductor itself runs in tests/gpu/test_accelerators_cuda.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi_train.config.schema import TrainerConfig
from magi_train.config.validate import _check_trainer
from magi_train.model.compile import compile_layers
from magi_train.model.dit import build_dit
from tests.distributed.common import inputs, tiny

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_process_group")


def _loss_and_grads(model, seed: int):
    x, t, caption, mask, ranges, weight = inputs(model.cfg, N=1, chunks=2, size=4, seed=seed)
    model.zero_grad(set_to_none=True)
    out = model(x, t, caption, mask, ranges)
    loss = (out * weight[..., :4, :4]).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, int(mask.sum())


class GraphRecorder:
    """A torch.compile backend: aot_eager, recording each compiled graph's code (no shapes in it)."""

    def __init__(self):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner, self.graphs = lookup_backend("aot_eager"), []

    def __call__(self, gm, example_inputs):
        if any(node.op.startswith("call") for node in gm.graph.nodes):
            self.graphs.append(gm.code)
        return self.inner(gm, example_inputs)


def test_compiled_layers_match_eager_keep_their_keys_and_do_not_recompile(one_thread):
    cfg = tiny(num_layers=2)
    eager = build_dit(cfg, init_seed=3)
    with torch.no_grad():  # the zero-initialised output layer would leave every other gradient zero
        eager.final_linear.linear.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    compiled = build_dit(cfg, init_seed=0)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    names = [n for n, _ in compiled.named_parameters()]
    recorder = GraphRecorder()

    assert compile_layers(compiled, backend=recorder) == 2
    assert list(compiled.state_dict()) == keys and [n for n, _ in compiled.named_parameters()] == names
    assert not any("_orig_mod" in k for k in compiled.state_dict())

    captions = []
    for step, seed in enumerate((0, 1)):
        want_loss, want, tokens = _loss_and_grads(eager, seed)
        loss, grads, _ = _loss_and_grads(compiled, seed)
        captions.append(tokens)
        if step == 0:
            graphs = list(recorder.graphs)
            assert graphs  # the layers ran compiled ...
            assert len(set(graphs)) == len(graphs)  # ... the second one on the first one's graphs
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        # Tolerance relative to the largest gradient: some are zero up to rounding (a key-norm bias shifts every
        # score of a query alike, so softmax cancels it), where a relative comparison would be meaningless.
        scale = max(g.abs().max() for g in want.values())
        for name, g in want.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * float(scale), msg=name)
    assert captions[0] != captions[1]  # a new number of caption tokens ...
    assert recorder.graphs == graphs  # ... and no new compile: y_flat's token count is dynamic


def test_compile_refuses_an_unknown_mode_or_a_second_compile():
    model = build_dit(tiny(num_layers=1))
    with pytest.raises(ValueError, match=r"trainer\.compile_mode='fast' is not one of"):
        compile_layers(model, "fast")
    with pytest.raises(ValueError, match=r"trainer\.compile_mode='max-autotune' applies to the inductor backend"):
        compile_layers(model, "max-autotune", backend="aot_eager")
    compile_layers(model, backend="eager")  # lazy: nothing is traced until the first call
    with pytest.raises(RuntimeError, match="already applied"):
        compile_layers(model, backend="eager")


def test_validate_names_the_compile_mode():
    problems = list(_check_trainer(TrainerConfig(compile_mode="fast")))
    assert any(p.startswith("trainer.compile_mode ('fast') must be one of 'default', 'reduce-overhead'") for p in problems)


def test_build_train_stages_compiles_after_building_and_only_when_asked(monkeypatch, tmp_path):
    from magi_train.parallel import parallelize
    from tests.configs import tiny_train_config
    from tests.unit.test_parallelize import fake_parallel

    calls = []

    def record(model, mode):
        # The layers are materialised and parallelised by now (the optimizer is built on what comes back).
        assert all(p.device.type == "cpu" for p in model.parameters())
        calls.append(mode)
        return 0

    monkeypatch.setattr(parallelize, "compile_layers", record)
    for compile_on in (False, True):
        cfg = tiny_train_config(tmp_path, compile=compile_on, compile_mode="max-autotune")
        parallelize.build_train_stages(cfg, fake_parallel(), "ulysses")
    assert calls == ["max-autotune"]


@pytest.mark.slow  # a fresh interpreter: ~6 s
def test_building_without_compile_does_not_import_torch_dynamo(tmp_path):
    code = ("import sys; from tests.configs import tiny_train_config; from tests.unit.test_parallelize import fake_parallel;"
            "from magi_train.parallel.groups import init_distributed; init_distributed();"
            "import magi_train.training.trainer; from magi_train.parallel.parallelize import build_train_stages;"
            f"build_train_stages(tiny_train_config({str(tmp_path)!r}), fake_parallel(), 'ulysses');"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
