"""CLI: one-line errors with exit status 2, help with examples, shipped configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_mole.cli import build_parser, main
from llava_mole.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "/nonexistent/config.yaml"], "config file not found: /nonexistent/config.yaml"),
        (["export-peft", "/nonexistent/adapter", "/tmp/out"], "adapter directory not found"),
        (["train", "CFG", "--set", "train.max_stepz=3"], "train.max_stepz: unknown key"),
        (["train", "CFG", "--set", "model.path=/nonexistent/model"], "data.mixture: required"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    argv = [str(cfg) if a == "CFG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the message and the --debug hint


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="config file not found"):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2


def test_every_command_has_help_with_examples():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    expected = {
        "demo",
        "make-tiny",
        "make-data",
        "convert",
        "train",
        "pretrain",
        "eval",
        "predict",
        "compare",
        "export-peft",
        "merge",
        "export-moe",
        "serve",
    }
    assert set(sub.choices) == expected
    for name, p in sub.choices.items():
        assert "examples:" in p.format_help(), name


@pytest.mark.parametrize("name", ["tiny-mole.yaml", "tiny-lora.yaml", "llava-1.5-7b-mole.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_train_config(REPO / "configs" / name)
    assert config.adapter.type in ("mole", "lora")
    if name.startswith("llava"):
        a, t = config.adapter, config.train
        assert (a.num_experts, a.rank, a.alpha, t.learning_rate, t.lr_scheduler) == (
            3,
            32,
            64,
            2e-4,
            "cosine",
        )
        assert (t.warmup_ratio, t.epochs, t.precision, t.gradient_checkpointing) == (
            0.03,
            1.0,
            "bf16",
            True,
        )


def test_make_data_words_questions_and_answers_per_domain(tmp_path):
    import json

    out = tmp_path / "world"
    args = ["make-data", str(out), "--samples-per-domain", "8", "--test-per-domain", "2"]
    args += ["--num-classes", "4", "--code-questions", "domain", "--code-answers", "domain"]
    assert main(args) == 0
    samples = json.loads((out / "cells" / "train.json").read_text())
    code = [s for s in samples if s["task"] == "code"]
    assert code and all(s["conversations"][1]["value"].startswith("slide ") for s in code)
    assert all(s["conversations"][0]["value"].endswith("this slide?") for s in code)
