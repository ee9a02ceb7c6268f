"""megatron-core is imported without paying for torch.compile's machinery or wandb (magi_train/mcore.py), and
what it compiles still compiles, on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from magi_train.mcore import _compile_on_first_call

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a fresh interpreter importing both programs: ~6 s
def test_the_entry_points_start_and_build_on_meta_without_torch_dynamo():
    # One fresh interpreter (the pytest process has imported everything by now): both programs' imports.
    # Building the model on the meta device (what generate does first) must not load them either.
    # The programs import megatron-core only when they use it (one-process inference never does); then it comes
    # through magi_train.mcore, as every use of it does.
    code = ("import sys, magi_train.train, magi_infer.generate, torch;"
            "from magi_train.config.compose import load_model_preset; from magi_train.model.dit import meta_dit;"
            "meta_dit(load_model_preset('tiny'));"
            "print(sorted(m for m in ('megatron', 'sympy', 'transformers', 'wandb') if m in sys.modules));"
            "import magi_train.mcore, megatron.core.jit as jit;"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'wandb') if m in sys.modules));"
            "print(torch.compile.__module__);"
            "import importlib.util; print(importlib.util.find_spec('wandb') is not None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    programs, loaded, compile_module, wandb_findable = done.stdout.split("\n")[:4]
    assert programs == "[]", f"importing the programs and building a model on meta imported {programs}"
    assert loaded == "[]", f"importing megatron-core imported {loaded}"
    assert compile_module == "torch", "torch.compile was not restored after importing megatron-core"
    # wandb is hidden from megatron only while it is imported: a run that logs to wandb can still import it.
    assert wandb_findable == "True", "wandb is still marked unimportable after importing megatron-core"


def test_a_deferred_function_is_compiled_once_on_first_call_with_its_arguments():
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append((fn.__name__, kwargs))
        return lambda *a: ("compiled", fn(*a))

    deferred = _compile_on_first_call(fake_compile)

    @deferred
    def double(x):
        return 2 * x

    @deferred(dynamic=False)
    def triple(x):
        return 3 * x

    assert calls == [] and double.__name__ == "double"  # nothing compiled by decorating
    assert double(2) == ("compiled", 4) and double(3) == ("compiled", 6)
    assert triple(1) == ("compiled", 3)
    assert calls == [("double", {}), ("triple", {"dynamic": False})]
