"""`--help` composed by magi_train/config/help.py says what Hydra's own help says (groups, composed config),
and only plain help requests are answered there: everything else goes to Hydra."""

from __future__ import annotations

import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

import magi_infer.generate as generate_module
from magi_train.config.help import _plain_help_request, answer_help, help_text


def _body(text: str) -> list[str]:
    """The lines from the groups heading to the end of the config, blank lines dropped."""
    lines = [line for line in text.splitlines() if line.strip()]
    start = lines.index("== Configuration groups ==")
    end = max(i for i, line in enumerate(lines) if not line.startswith(("Powered by Hydra", "Use --hydra-help")))
    return lines[start:end + 1]


def test_the_help_is_hydras_groups_and_composed_config(monkeypatch, capsys):
    ours = help_text("magi-generate", "generate", ["model=tiny", "num_frames=48"])
    monkeypatch.setattr(sys, "argv", ["generate.py", "--help", "model=tiny", "num_frames=48"])
    try:
        with pytest.raises(SystemExit) as done:
            generate_module.hydra_main()  # Hydra's own --help, in this process; it exits after printing
        assert done.value.code in (0, None)
    finally:
        GlobalHydra.instance().clear()
    hydras = capsys.readouterr().out
    assert "num_frames: 48" in ours and "model: " in ours
    assert _body(ours) == _body(hydras)


@pytest.mark.parametrize("argv, overrides", [
    (["--help"], []),
    (["-h", "model=tiny", "+extra=1"], ["model=tiny", "+extra=1"]),
    (["model=tiny"], None),  # not a help request: the program runs
    (["--hydra-help"], None),  # Hydra's own flags and keys are Hydra's
    (["--help", "--cfg", "job"], None),
    (["--help", "hydra.run.dir=x"], None),
])
def test_only_plain_help_requests_are_answered_here(argv, overrides):
    assert _plain_help_request(argv) == overrides


def test_an_override_that_does_not_compose_is_left_to_hydra(capsys):
    assert answer_help("magi-generate", "generate", ["--help", "model=no_such_preset"]) is False
    assert capsys.readouterr().out == ""
