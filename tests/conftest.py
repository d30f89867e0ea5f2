"""Lets plain `pytest` (not only `python -m pytest`) import the repo's flat modules from any working directory;
the saved_run fixture (a backbone.pth where detect.py and probe.py look for one) is shared by their tests."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def saved_run(tmp_path, monkeypatch):
    """The working directory becomes tmp_path, holding runs/a/backbone.pth (a seed-5 tiny ViT); -> that ViT."""
    import torch
    import model  # here, after the path set-up above
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    torch.manual_seed(5)
    saved = model.build("tiny")
    torch.save(saved.state_dict(), tmp_path / "runs" / "a" / "backbone.pth")
    return saved
