"""The T5 encoder's and the caption cleaning's packages are the optional `t5` extra: missing, they are reported
with the install command when used, and importing our modules does not need them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from magi_train.model.text.clean import prepare_prompt
from magi_train.model.text.t5 import T5TextEncoder


@pytest.mark.parametrize("missing", ["ftfy", "bs4"])
def test_caption_cleaning_without_its_package_names_the_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # a None entry makes `import` fail as if not installed
    with pytest.raises(ImportError, match=r"pip install '\.\[t5\]' in the magi clone") as info:
        prepare_prompt("A <b>red</b> fox")
    assert repr(missing) in str(info.value)


def test_t5_encoder_without_transformers_names_the_extra(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a folder that passes the layout check
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"text.encoder=t5.*'transformers'.*pip install '\.\[t5\]' in the magi clone"):
        T5TextEncoder(tmp_path)


def test_importing_the_text_modules_imports_none_of_the_extra():
    code = ("import sys, magi_train.model.text.t5, magi_train.model.text.clean;"
            "print(sorted(m for m in ('transformers', 'sentencepiece', 'ftfy', 'bs4') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"
