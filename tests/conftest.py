"""Lets plain `pytest` (not only `python -m pytest`) import the repo's flat modules from any working directory;
the saved_run fixture (backbone.pth files where detect.py and probe.py look for one) is shared by their tests,
torch_compile by the tests of --compile, and inproc (a script's command line run in this process) by the tests of
one-line errors."""
import contextlib
import io
import runpy
import subprocess
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


def inproc(script, *argv):
    """A script's command line without a new interpreter (2 s of imports saved): run here as __main__, its
    exit status and what it wrote -> the same CompletedProcess."""
    out, err, saved, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [script, *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:  # sys.exit("error: ...") prints the text and exits 1, as Python does
        code = e.code if isinstance(e.code, int) else 1
        err.write("" if isinstance(e.code, int) or e.code is None else f"{e.code}\n")
    finally:
        sys.argv = saved
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def dies_on_call(real, n):
    """`real` wrapped to raise KeyboardInterrupt on its n-th call: a killed run, for the resume
    tests."""
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)
    return wrapped
