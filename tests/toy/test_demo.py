"""`llava-mole demo --quick`: the whole pipeline end to end on a very small world."""

from __future__ import annotations

import json

import pytest
import torch

from llava_mole.cli import main

pytestmark = pytest.mark.slow  # end to end; `-m 'not slow'` leaves it out


def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    try:
        assert (
            main(
                [
                    "demo",
                    "--quick",
                    "--seeds",
                    "1",
                    "--workers",
                    "1",
                    "--out",
                    str(tmp_path / "demo"),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    study = tmp_path / "demo" / "study"
    for name in ("report.md", "results.json", "scores.png", "loss_curves.png", "routing.png"):
        assert (study / name).is_file(), name
    results = json.loads((study / "results.json").read_text())
    assert set(results["domains"]) == {"general", "document", "biomedical"}
    report = (study / "report.md").read_text()
    assert "Verdict" in report and "mix_mole" in report
    printed = capsys.readouterr().out
    assert "[demo] done" in printed
    assert "[study] verdict" in printed
    assert all(f"  - {line}" in printed for line in results["verdict"]["lines"])
