"""Run folders are never silently lost, and every bad flag or file gets one clear line (issue 10).

Each test feeds one bad input and checks the exact refusal: the message, the exit code, and no
traceback."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import phantoms
import pretrain
import utils
from conftest import inproc

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--global-size", "28", "--local-size", "14", "--prototypes", "64", "--head-hidden", "32",
         "--head-bottleneck", "16", "--warmup", "0", "--freeze-last-layer", "0",
         "--teacher-temp-warmup", "0", "--batch-size", "2", "--eval-every", "0", "--log-every", "1",
         "--device", "cpu"]


def cli(script, *argv, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def one_line(run, code, *fragments):
    """The process exited with `code` and said exactly one line on stderr, holding every fragment
    (besides the one "data: skipping" line per unreadable file, which is the log, not the error)."""
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()
             and not line.startswith("data: skipping ")]
    assert run.returncode == code and len(lines) == 1, (run.returncode, run.stderr[-3000:])
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return phantoms.synthetic_archive(tmp_path_factory.mktemp("syn") / "a", patients=1, seed=3,
                                      shape=(4, 64, 48))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, archive):
    """A finished 2-step run: ckpt.pt, backbone.pth, args.json, metrics.jsonl, curves.png."""
    out = tmp_path_factory.mktemp("runs") / "done"
    pretrain.train(pretrain.get_args(["--data", str(archive), "--out", str(out), "--steps", "2",
                                      "--save-every", "1", "--workers", "0", *SMALL]))
    return out


def test_a_run_folder_holds_its_curves(finished):
    """curves.png shows the logged terms (utils.draw_curves is tested alone in test_metrics)."""
    from PIL import Image
    assert sorted(p.name for p in finished.iterdir()) == [
        "args.json", "backbone.json", "backbone.pth", "ckpt.pt", "curves.png", "metrics.jsonl"]
    assert Image.open(finished / "curves.png").size[0] > 600


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# 1. run folders -----------------------------------------------------------------------------------

def test_fresh_run_refuses_a_folder_holding_a_run_and_a_failed_start_changes_nothing(
        finished, archive, tmp_path):
    before = snapshot(finished)
    run = cli("pretrain.py", "--data", archive, "--out", finished, "--steps", "2", *SMALL)
    one_line(run, 1,
             f"error: {finished}: already holds a run (ckpt.pt); use --resume auto to continue it, "
                     "another --out, or --overwrite to replace it")
    run = cli("pretrain.py", "--data", "/nonexistent", "--out", finished, "--resume", "auto",
              "--steps", "2", "--save-every", "1", *SMALL)
    one_line(run, 1, "error: /nonexistent: not a folder or a .csv manifest")
    assert snapshot(finished) == before  # args.json still names the real data; nothing was appended


def test_probe_refuses_the_pretraining_folder_of_its_backbone(finished, archive):
    """probe.py --out on a pretrain run folder (no metrics.json there) once replaced its args.json
    and emptied its metrics.jsonl; now another script's run folder is refused as a finished one."""
    before = snapshot(finished)
    run = cli("probe.py", "--data", archive / "exams.csv", "--backbone", finished / "backbone.pth",
              "--arch", "tiny", "--out", finished, "--size", "28", "--workers", "0")
    one_line(run, 1, f"error: {finished}: already holds a run of pretrain.py (its args.json); use "
                     "another --out")
    assert snapshot(finished) == before


def test_overwrite_starts_afresh_without_mixing_metrics(finished, archive, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    pretrain.train(pretrain.get_args(["--data", str(archive), "--out", str(out), "--steps", "1",
                                      "--overwrite", "--workers", "0", *SMALL]))
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl"))
             if r["split"] == "train"]
    assert steps == [1] and json.load(open(out / "args.json"))["steps"] == 1
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1


# 2. --resume failures -----------------------------------------------------------------------------

def test_resume_failures_are_one_line_naming_the_file(finished, archive, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    cut = tmp_path / "cut.pt"
    raw = (finished / "ckpt.pt").read_bytes()
    cut.write_bytes(raw[:len(raw) // 2])
    cases = [(text, ValueError, "not a readable PyTorch checkpoint"),
             (cut, ValueError, "not a readable PyTorch checkpoint"),
             (tmp_path / "missing.pt", FileNotFoundError, "no such checkpoint file"),
             (finished / "backbone.pth", ValueError, "not a pretrain.py ckpt.pt")]
    # the script prints each as one `error:` line (OSError and ValueError)
    for path, kind, reason in cases:
        args = pretrain.get_args(["--data", str(archive), "--out", str(tmp_path / "r"), "--resume",
                                  str(path), *SMALL])
        with pytest.raises(kind, match=reason) as e:
            pretrain.train(args)
        assert str(path) in str(e.value)
    args = pretrain.get_args(["--data", str(archive), "--out", str(tmp_path / "r"), "--resume",
                              str(finished / "ckpt.pt"), *SMALL, "--prototypes", "128"])
    with pytest.raises(ValueError,
                       match="does not fit the flags: --prototypes 64 in the checkpoint, 128 now"):
        pretrain.train(args)
    # another seed would silently change every later batch, mask and drop-path draw: not a
    # continuation
    args = pretrain.get_args(["--data", str(archive), "--out", str(tmp_path / "r"), "--resume",
                              str(finished / "ckpt.pt"), *SMALL, "--seed", "7", "--steps", "2"])
    with pytest.raises(ValueError,
                       match="does not fit the flags: --seed 0 in the checkpoint, 7 now"):
        pretrain.train(args)
    # a run from before --mip-margin resampled its crops at 2.5: resumed only with that margin
    old = torch.load(finished / "ckpt.pt", weights_only=True)
    del old["args"]["mip_margin"]
    torch.save(old, tmp_path / "old.pt")
    args = pretrain.get_args(["--data", str(archive), "--out", str(tmp_path / "r"), "--resume",
                              str(tmp_path / "old.pt"), *SMALL])
    with pytest.raises(ValueError, match="--mip-margin 2.5 in the checkpoint, 6.0 now"):
        pretrain.train(args)
    assert not (tmp_path / "r").exists()  # no failed start made a run folder
    # a broken ckpt.pt found by --resume auto: the same one line, from the CLI
    corrupt = tmp_path / "corrupt"
    shutil.copytree(finished, corrupt)
    (corrupt / "ckpt.pt").write_bytes(raw[:100])
    run = cli("pretrain.py", "--data", archive, "--out", corrupt, "--resume", "auto", *SMALL)
    one_line(run, 1, f"error: {corrupt / 'ckpt.pt'}: not a readable PyTorch checkpoint")


def test_resume_from_elsewhere_and_overwrite_with_bad_data_leave_a_run_whole(
        finished, archive, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    before = snapshot(other)
    # a finished run relaunched with --resume auto (a requeued job): nothing to do, nothing appended
    pretrain.train(pretrain.get_args(["--data", str(archive), "--out", str(other), "--resume",
                                      "auto", "--steps", "2", "--save-every", "1", "--workers",
                                      "0", *SMALL]))
    assert snapshot(other) == before
    # --resume of one run's ckpt.pt with --out naming another run: that run was overwritten without
    # a word
    run = cli("pretrain.py", "--data", archive, "--out", other, "--resume", finished / "ckpt.pt",
              "--steps", "2", "--save-every", "1", *SMALL)
    one_line(run, 1, f"error: {other}: already holds a run (ckpt.pt)")
    # --overwrite, but the data is wrong: the start fails before the old run's files are removed
    run = cli("pretrain.py", "--data", tmp_path / "nonexistent", "--out", other, "--overwrite",
              *SMALL)
    one_line(run, 1, "nonexistent: not a folder or a .csv manifest")
    assert snapshot(other) == before


# 3. numeric flags, 4. --help ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--lr", "-0.01"], "argument --lr: -0.01 is outside (0, inf]"),
    (["--save-every", "0"], "argument --save-every: 0 is outside [1, inf]"),
    (["--log-every", "0"], "argument --log-every: 0 is outside [1, inf]"),
    (["--steps", "0"], "argument --steps: 0 is outside [1, inf]"),
    (["--steps", "-5"], "argument --steps: -5 is outside [1, inf]"),
    (["--batch-size", "0"], "argument --batch-size: 0 is outside [1, inf]"),
    (["--workers", "-1"], "argument --workers: -1 is outside [0, inf]"),
    (["--mip-margin", "0.5"], "argument --mip-margin: 0.5 is outside [1, inf]"),
    (["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
    (["--recipe", "nosuch"], "argument --recipe: invalid choice: 'nosuch'"),
    (["--model", "vitz14"], "argument --model: invalid choice: 'vitz14'"),
    (["--global-size", "100"],
     "argument --global-size: 100 is not a multiple of the patch size 14"),
    (["--batch-size", "1"], "argument --batch-size: KoLeo needs at least 2 images per process"),
    (["--seed", str(2**31)], f"argument --seed: {2**31} is outside [0, {2**31 - 1}]"),
    # a 400-digit integer: no OverflowError traceback
    (["--seed", "9" * 400], f"is outside [0, {2**31 - 1}]"),
    (["--cache-bytes", "inf"], "argument --cache-bytes: 'inf' is not a size such as 50G"),
    (["--cache-bytes", "1e400G"], "argument --cache-bytes: '1e400G' is not a size such as 50G"),
    (["--cache-bytes", "512K"], "argument --cache-bytes: 512K is below 1M"),
])
def test_bad_flags_are_one_line_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        pretrain.get_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.get_args(["--device", "cuda"])
    assert e.value.code == 2 and "argument --device: cuda was asked for" in capsys.readouterr().err


def test_help_shows_the_value_each_flag_takes_for_the_preset(capsys):
    for preset, steps, batch in [("tiny", 300, 8), ("dbt-dino", 60000, 160)]:
        with pytest.raises(SystemExit):
            pretrain.get_args(["--preset", preset, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "(default: None)" not in text
        assert f"total iterations (default: {steps})" in text
        assert f"(global batch = this x world size) (default: {batch})" in text
    with pytest.raises(SystemExit):  # phantoms.py: --out and --patients depend on --dataset
        phantoms.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    want = f"none given: 8 for dbt, else vindr {phantoms.PATIENTS_2D['vindr']}"
    assert "(default: None)" not in text and want in text


# 6. skipped files are counted ---------------------------------------------------------------------

def test_unreadable_volumes_are_counted_over_workers_and_can_stop_the_run(archive, tmp_path):
    src = tmp_path / "mixed"
    shutil.copytree(archive, src)
    bad = src / "Breast-Cancer-Screening-DBT" / "broken.dcm"
    bad.write_bytes(b"DICM" * 10)  # not DICOM at all
    out = tmp_path / "run"
    run = cli("pretrain.py", "--data", src, "--out", out, "--steps", "2", "--workers", "1", *SMALL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"data: 1 of 5 volumes skipped as unreadable\n  {bad}: " in run.stdout
    assert " skipped 1 | lr " in run.stdout  # the progress line shows the total once it is non-zero
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert last["split"] == "data" and last["skipped"] == 1 and last["volumes"] == 5
    run = cli("pretrain.py", "--data", src, "--out", tmp_path / "strict", "--steps", "2",
              "--workers", "1", "--max-skip-fraction", "0.1", *SMALL)
    one_line(run, 1,
             "error: 1 of 5 volumes are unreadable, more than --max-skip-fraction 0.1; the first: "
                     f"{bad}: ")


# 7. phantoms.py -----------------------------------------------------------------------------------

def test_synth_reuses_refuses_and_validates(tmp_path):
    out = tmp_path / "arch"
    run = inproc("phantoms.py", "--out", out, "--patients", "1", "--slices", "2", "--height", "64",
              "--width", "48")
    assert run.returncode == 0 and run.stdout.strip() == f"wrote {out}: 4 volumes of 1 patients"
    run = inproc("phantoms.py", "--out", out, "--patients", "1", "--slices", "2", "--height", "64",
              "--width", "48")
    assert run.returncode == 0
    assert run.stdout.strip() == f"reused {out}: 4 volumes of 1 patients, 2x64x48"
    # another shape: said, not hidden
    run = inproc("phantoms.py", "--out", out, "--patients", "1", "--slices", "5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (f"reused {out}: 4 volumes of 1 patients, 2x64x48; 1 patients of "
                                  "5x256x192 were asked for: remove the folder to rewrite it")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_line(inproc("phantoms.py", "--out", other), 1,
             f"error: {other}: exists and is not an archive written by phantoms.py")
    for bad in ("0", "-1"):
        one_line(inproc("phantoms.py", "--out", tmp_path / "x", "--patients", bad), 2,
                 f"argument --patients: {bad} is outside [1, 100000]")
    one_line(inproc("phantoms.py", "--out", tmp_path / "x", "--height", "8"), 2,
             "argument --height: 8 is outside")


# 8. the cache folder and the code version ---------------------------------------------------------

def test_git_sha_is_the_repos_own_from_any_folder(tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout
    monkeypatch.chdir(tmp_path)
    assert utils.git_sha() == head.strip() and len(head.strip()) == 40
    readme = (ROOT / "README.md").read_text()
    assert "DBT_DINO_CACHE" in readme and "cache/" in readme


# 9. under torchrun: one line, said once -----------------------------------------------------------

def test_torchrun_bad_input_is_said_once(tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(ROOT / "pretrain.py"), "--data", "/nonexistent",
                          "--out", str(tmp_path / "r"), *SMALL], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode != 0, run.stderr
    assert errors == ["error: /nonexistent: not a folder or a .csv manifest"], run.stderr
    # our line comes before anything torchrun adds
    assert "Traceback" not in run.stderr.split(errors[0])[0]


# 10. several --data sources, mixed by weight -------------------------------------------------------

def test_sources_are_drawn_by_weight_not_by_file_count(archive, tmp_path):
    """One 1-file folder and the 4-volume archive, weights 0.03 and 0.97: over 10,000 volume draws
    (the stream's own, over epochs, 2 ranks x 2 workers) each source's share is within 3 standard
    errors of its weight, not of its file count's 1/5; items and batches say their source."""
    one = tmp_path / "one"
    one.mkdir()
    phantoms.write_phantom_dicom(one / "v.dcm", (2, 64, 48), seed=4)
    kw = dict(cache_dir=tmp_path / "c", global_size=28, local_size=14, n_local=1)
    ds = data.PretrainStream([one, archive], weights=[0.03, 0.97], **kw)
    assert len(ds.paths) == 5 and ds.source_of.tolist() == [0, 1, 1, 1, 1]
    draws, epoch = [], 0
    while len(draws) < 10_000:
        for rank, worker in ((0, 0), (0, 1), (1, 0), (1, 1)):
            draws += ds.volume_draws(epoch, rank, 2, worker, 2)
        epoch += 1
    first = (ds.source_of[np.array(draws[:10_000])] == 0).mean()
    assert abs(first - 0.03) <= 3 * np.sqrt(0.03 * 0.97 / 10_000), first
    even = data.PretrainStream([one, archive], **kw)  # no weights: equal shares
    draws = [v for e in range(2000) for v in even.volume_draws(e)][:10_000]
    assert abs((even.source_of[np.array(draws)] == 0).mean() - 0.5) <= 3 * np.sqrt(0.25 / 10_000)
    items = [item for item, _ in zip(ds, range(8))]
    assert {i["source"] for i in items} <= {0, 1}
    batch = data.collate_pretrain(items[:4], patch_size=14)
    assert batch["source"].tolist() == [i["source"] for i in items[:4]]
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no DICOM files to mix in"):
        data.PretrainStream([one, tmp_path / "none"], **kw)
    with pytest.raises(ValueError, match="one weight >= 0 per --data source"):
        data.PretrainStream([one, archive], weights=[1.0], **kw)


def test_a_mixed_run_logs_each_sources_share(archive, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    phantoms.write_phantom_dicom(one / "v.dcm", (2, 64, 48), seed=4)
    out = tmp_path / "run"
    pretrain.train(pretrain.get_args(["--data", str(archive), str(one), "--data-weights", "3",
                                      "1", "--out", str(out), "--steps", "2", "--workers", "0",
                                      *SMALL]))
    logs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    shares = [r["source_share"] for r in logs if r["split"] == "train"]
    assert len(shares) == 2 and all(len(s) == 2 and abs(sum(s) - 1) < 1e-9 for s in shares)
    args = json.loads((out / "args.json").read_text())
    assert args["data"] == str(archive) and args["sources"] == [str(archive), str(one)]
    with pytest.raises(SystemExit):
        pretrain.get_args(["--data", str(archive), str(one), "--data-weights", "1"])
