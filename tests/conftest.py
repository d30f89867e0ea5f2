"""Lets plain `pytest` (not only `python -m pytest`) import the repo's flat modules from any working directory;
the saved_run fixture (backbone.pth files where detect.py and probe.py look for one) is shared by their tests, and
torch_compile by the tests of --compile."""
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def saved_run(tmp_path, monkeypatch):
    """The working directory becomes tmp_path, holding runs/b/backbone.pth (a seed-5 tiny ViT) and an older
    runs/a/backbone.pth (seed 6); -> the newest one's ViT."""
    import os
    import torch
    import model  # here, after the path set-up above
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a", 6), ("b", 5)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        torch.manual_seed(seed)
        saved = model.build("tiny")
        torch.save(saved.state_dict(), tmp_path / "runs" / name / "backbone.pth")
    os.utime(tmp_path / "runs" / "a" / "backbone.pth", (1e9, 1e9))  # older whatever the file system's clock says
    return saved


@pytest.fixture(scope="session")
def torch_compile():
    """torch.compile's CPU backend builds C++ at run time: a test of compiled code fails here, with the reason,
    instead of skipping, on a machine without a working g++ (.ci/run installs one)."""
    import torch
    try:
        ok = torch.compile(lambda t: t * 2 + 1)(torch.ones(3)).sum().item() == 9.0
    except Exception as e:  # the toolchain's own message says what is missing
        pytest.fail(f"torch.compile cannot run on this machine (needs g++ and the Python headers): {e}")
    assert ok, "torch.compile ran but computed 2 * 1 + 1 wrongly"
