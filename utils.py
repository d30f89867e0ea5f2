"""What every script needs in order to run: torch.distributed from torchrun, rank-0 logs,
seeding, argparse types, atomic files and checkpoints, tables (CSV, .xlsx read and written), run
folders, metrics.jsonl and run figures.

Run-folder rules (pretrain.py, probe.py, detect.py, show.py, `metrics.py compare`):
- A fresh run refuses an --out holding a run (ckpt.pt or an output) in one line saying what to do.
- args.json names the script that wrote it; a script refuses a folder another script owns (probe.py
  pointed at its backbone's pretraining folder would otherwise erase that run's metrics.jsonl).
- --overwrite clears the old run only once the new inputs are checked: a bad start leaves it whole.
- A resume refuses flags unlike the checkpoint's, and drops metrics.jsonl records after its step.
- Every write is atomic (a temporary name, then os.replace): a crash leaves the old file or the new.
"""

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import torch
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

# --------------------------------------------------------- processes: distributed, logging, seeding
SEED_MAX = 2**31 - 1  # --seed flags: numpy seeds are 32-bit, and rank and step are added to them


def setup_distributed():
    """Join torchrun's process group (else run alone) -> (rank, local_rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, local_rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def rank_world():
    """(rank, world size) of this process: the one place the stream, the losses and the logs ask."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main():
    """True on rank 0, the rank that logs and writes the run folder."""
    return rank_world()[0] == 0


def all_reduce(x):
    """Sum a tensor over ranks in place (a no-op in a single process); returns it."""
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(x)
    return x


def log(msg):
    """Print on rank 0 only, flushed (progress lines under torchrun are not repeated per rank)."""
    if is_main():
        print(msg, flush=True)


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch with seed + rank, so that ranks draw different augmentations."""
    seed = seed + rank
    if seed >= 2**32:  # seed + 65536 x step outgrew numpy's 32 bits: hashed, not wrapped to step 0
        seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ argparse types and shared flags
def number(kind, lo=None, hi=None, lo_open=False):
    """argparse type: `kind` (int or float) in [lo, hi], lo excluded when lo_open. (int, 1) is a
    positive count, (float, 0, lo_open=True) a positive rate, (float, 0, 1) a fraction."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        low_bad = lo is not None and (x <= lo if lo_open else x < lo)
        if low_bad or (hi is not None and x > hi) or (kind is float and not math.isfinite(x)):
            rng = f"{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if lo_open else '['}{rng}")
        return x
    parse.__name__ = kind.__name__  # argparse shows "invalid int value" style names
    return parse


def byte_size(text):
    """argparse type: a byte count, optionally suffixed K/M/G/T (powers of 2), at least 1 MiB."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number_part, unit = text.upper().rstrip("IB"), ""
    if number_part[-1:] in units:
        number_part, unit = number_part[:-1], number_part[-1]
    try:
        n = int(float(number_part) * units[unit])
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 50G or 500M") from None
    if n < 2**20:
        raise argparse.ArgumentTypeError(f"{text} is below 1M")
    return n


def one_line_errors(parser):
    """A bad flag prints one line naming it (not argparse's whole usage block) and exits with 2."""
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    return parser


def add_dicomweb_flags(p, manifest_help):
    """The flags of a DICOMweb --data source, shared by pretrain.py and probe.py."""
    p.add_argument("--manifest", default="", help=manifest_help + " (credentials: DICOMWEB_TOKEN, "
                   "or DICOMWEB_USER + DICOMWEB_PASSWORD, or --dicomweb-credentials)")
    p.add_argument("--dicomweb-credentials", default="",
                   help="file (mode 600, outside the repo) of DICOMWEB_TOKEN= or DICOMWEB_USER= "
                   "and DICOMWEB_PASSWORD= lines; instead of the environment")
    p.add_argument("--dicomweb-ca-bundle", default="",
                   help="PEM file of CAs to trust for https, besides the system's")
    p.add_argument("--cache-bytes", type=byte_size, default="50G", help="cap of the rotating "
                   "DICOMweb cache under $DBT_DINO_CACHE (suffixes K, M, G, T: powers of 2)")


# ----------------------------------------------------------- files: CSV, atomic writes, checkpoints
def read_csv(path):
    """The rows (dicts) of a CSV file, as utf-8-sig (spreadsheets write a byte-order mark); a binary
    file or a cell over csv's field size limit is one ValueError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh))
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None


def cache_base():
    """The cache folder: $DBT_DINO_CACHE, else ./cache."""
    return Path(os.environ.get("DBT_DINO_CACHE", "cache"))


def tmp_name(path):
    """A temporary name no other process writes, even on another node sharing the cache."""
    return f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def atomic_write(path, text: str) -> None:
    """Write-then-rename: a crash leaves the old file or the new one, never a mixture."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_table(path, sheet=None):
    """Rows (dicts) of a table: an .xlsx by its suffix (its first sheet, or `sheet`), else a CSV."""
    if Path(path).suffix.lower() == ".xlsx":
        return read_xlsx(path, sheet)
    return read_csv(path)


def read_xlsx(path, sheet=None):
    """Rows (dicts, header = first row) of an .xlsx's first sheet, or of the one named `sheet`.

    An .xlsx is a zip of XML: xl/workbook.xml names the sheets, its .rels maps them to worksheets,
    whose cells hold a number, a shared-string index or an inline string, each placed by its
    reference ("C5") so absent cells read "". Numbers read as a CSV export writes them (61, not
    61.0); empty rows go. Not a zip, or no sheet: a one-line ValueError naming the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            strings = [_xml_text(si) for si in _xml(zf, "xl/sharedStrings.xml")] \
                if "xl/sharedStrings.xml" in names else []
            grid = _sheet_cells(_xml(zf, _sheet_member(zf, names, sheet, path)), strings)
    except (zipfile.BadZipFile, KeyError, IndexError, ET.ParseError) as e:
        raise ValueError(f"{path}: not a readable .xlsx ({type(e).__name__}: {e})") from None
    grid = [r for r in grid if any(x.strip() for x in r)]  # formatted but empty rows
    return [{h: r[j] if j < len(r) else "" for j, h in enumerate(grid[0]) if h}
            for r in grid[1:]] if grid else []


def write_xlsx(path, header, rows, sheet="Sheet1"):
    """One sheet as Excel writes it (a zip of XML): text in the shared strings, numbers as
    numbers, None or "" an absent cell; 26 columns at most."""
    strings, xml = {}, []
    for i, row in enumerate([header] + rows, 1):
        cells = [f'<c r="{chr(65 + j)}{i}" t="s"><v>{strings.setdefault(v, len(strings))}</v></c>'
                 if isinstance(v, str) else f'<c r="{chr(65 + j)}{i}"><v>{v}</v></c>'
                 for j, v in enumerate(row) if v not in (None, "")]
        xml.append(f'<row r="{i}">{"".join(cells)}</row>')
    ns = "http://schemas.openxmlformats.org/"
    main, rel = f'xmlns="{ns}spreadsheetml/2006/main"', f"{ns}officeDocument/2006/relationships"
    rels, ct = f'<Relationships xmlns="{ns}package/2006/relationships">', \
        "application/vnd.openxmlformats-officedocument.spreadsheetml."
    parts = {
        "[Content_Types].xml": f'<Types xmlns="{ns}package/2006/content-types"><Default Extension='
        '"rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default '
        'Extension="xml" ContentType="application/xml"/><Override PartName="/xl/workbook.xml" '
        f'ContentType="{ct}sheet.main+xml"/><Override PartName="/xl/worksheets/sheet1.xml" '
        f'ContentType="{ct}worksheet+xml"/><Override PartName="/xl/sharedStrings.xml" '
        f'ContentType="{ct}sharedStrings+xml"/></Types>',
        "_rels/.rels": f'{rels}<Relationship Id="rId1" Type="{rel}/officeDocument" '
        'Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook {main} xmlns:r="{rel}"><sheets><sheet name='
        f'"{escape(sheet)}" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'{rels}<Relationship Id="rId1" Type="{rel}/worksheet" '
        f'Target="worksheets/sheet1.xml"/><Relationship Id="rId2" Type="{rel}/sharedStrings" '
        'Target="sharedStrings.xml"/></Relationships>',
        "xl/sharedStrings.xml": f'<sst {main} count="{len(strings)}">' + "".join(
            f'<si><t xml:space="preserve">{escape(s)}</t></si>' for s in strings) + "</sst>",
        "xl/worksheets/sheet1.xml": f'<worksheet {main}><sheetData>{"".join(xml)}</sheetData>'
        "</worksheet>"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in parts.items():
            z.writestr(name, text)


def _xml(zf, member):
    """A member's XML, namespaces dropped from tags and attributes (r:id -> id, strict OOXML)."""
    root = ET.fromstring(zf.read(member))
    for e in root.iter():
        e.tag = e.tag.rsplit("}", 1)[-1]
        e.attrib = {k.rsplit("}", 1)[-1]: v for k, v in e.attrib.items()}
    return root


def _xml_text(item):
    """A string item's text: its <t>, or its rich-text runs' (phonetic <rPh> runs left out)."""
    return "".join(t.text or "" for t in item.findall("t") + item.findall("r/t"))


def _sheet_member(zf, names, sheet, path):
    """The zip member of the workbook's first sheet, or of the sheet named `sheet`."""
    sheets = []
    if {"xl/workbook.xml", "xl/_rels/workbook.xml.rels"} <= names:
        target = {r.get("Id"): r.get("Target") for r in _xml(zf, "xl/_rels/workbook.xml.rels")}
        for s in _xml(zf, "xl/workbook.xml").iter("sheet"):
            t = target[s.get("id")]  # relative to xl/, or absolute in the zip
            sheets.append((s.get("name", ""), t[1:] if t.startswith("/") else "xl/" + t))
    if not sheets:
        raise ValueError(f"{path}: no sheet in the workbook")
    found = [m for name, m in sheets if sheet is None or name.lower() == sheet.lower()]
    if not found:
        raise ValueError(f"{path}: no sheet {sheet!r} (it has {', '.join(n for n, _ in sheets)})")
    return found[0]


def _sheet_cells(root, strings):
    """A worksheet's rows as lists of cell texts, each cell at its reference's column."""
    grid = []
    for row in root.iter("row"):
        cells, col = [], -1
        for c in row.iter("c"):
            letters = (c.get("r") or "").rstrip("0123456789").upper()  # "AB12" -> "AB"
            col = sum(26 ** k * (ord(ch) - 64) for k, ch in enumerate(letters[::-1])) - 1 \
                if letters else col + 1
            cells += [""] * (col + 1 - len(cells))
            cells[col] = _cell_text(c, strings)
        grid.append(cells)
    return grid


def _cell_text(c, strings):
    kind, v = c.get("t"), c.findtext("v") or ""
    if kind == "s":
        return strings[int(v)]
    if kind == "inlineStr":
        return "".join(_xml_text(x) for x in c.findall("is"))
    if kind in (None, "n") and v:  # stored as the shortest exact decimal: 0.10000000000000001
        x = float(v)
        return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
    return v  # str (a formula's text), b (0/1), e (#N/A)


def csv_text(rows, columns=None):
    """Row dicts as CSV text (header first), quoted where a value needs it: an exam or patient ID
    may hold a comma. columns: the header and its order (default: the first row's keys)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = list(columns or rows[0])
    w.writerow(columns)
    w.writerows([r[c] for c in columns] for r in rows)
    return buf.getvalue()


def save_png(img, path) -> None:
    """A Pillow image to `path`, write-then-rename like atomic_write."""
    tmp = f"{path}.tmp.{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


def finite(x):
    """JSON-safe: NaN/inf -> None, numpy scalars and arrays -> Python."""
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def file_identity(path):
    """[resolved path, size, mtime in ns]; a missing file has no size (its exam is skipped)."""
    path = path.resolve()
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def load_cached(file):
    """A cached torch file's contents, or None (absent, another version's, or damaged)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # a file from another version, or damaged on disk: embed again
        return None


def save_checkpoint(path, state):
    """Write-then-rename, so a preempted save never leaves a half-written file behind."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True), with one-line errors naming the file: FileNotFoundError, or
    ValueError for what is not a PyTorch checkpoint (text, a truncated zip, a pickled object)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def backbone_file(spec):
    """probe.py's and detect.py's --backbone -> (file, or '' for an untrained ViT; how it was
    chosen). 'random': the untrained ViT; '': the newest runs/*/backbone.pth (a pretrain.py run)."""
    if spec == "random":
        return "", "--backbone random"
    if spec:
        return spec, "--backbone"
    runs = sorted(Path("runs").glob("*/backbone.pth"), key=lambda p: p.stat().st_mtime)
    if runs:
        return str(runs[-1]), "newest runs/*/backbone.pth"
    return "", "no --backbone, no runs/*/backbone.pth"


def recorded_preprocess(spec):
    """The preprocessing the --backbone (backbone_file's choice) was trained with, as pretrain.py
    records it beside backbone.pth (backbone.json: none or clahe), or None where nothing is said
    (a random ViT, an official checkpoint)."""
    path = backbone_file(spec)[0] if spec != "densenet121" else ""
    sidecar = Path(path).with_suffix(".json") if path else None
    if sidecar is None or not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text())["preprocess"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{sidecar}: not pretrain.py's backbone.json (no preprocess)") from None


def add_preprocess_flag(g):
    """--preprocess, shared by probe.py, detect.py and show.py (resolved by `preprocessing`)."""
    g.add_argument("--preprocess", default="auto", choices=["auto", "none", "clahe"],
                   help="what each displayed slice or image goes through before the backbone; "
                   "auto: the backbone's own (pretrain.py's backbone.json), else none")


def preprocessing(spec, choice):
    """--preprocess `choice` for --backbone `spec`: auto is what the backbone was trained with
    (recorded_preprocess; none when nothing is recorded). Said in one line; a choice that differs
    from the recorded one is said as such."""
    recorded = recorded_preprocess(spec)
    if choice == "auto":
        how = recorded or "none"
        log(f"preprocessing: {how} (" + ("as the backbone was trained" if recorded else
                                        "the backbone records none") + ")")
        return how
    if recorded and recorded != choice:
        log(f"--preprocess {choice}: the backbone was trained with {recorded}")
    return choice


# -------------------------------------------------------- run folders, progress line, metrics.jsonl
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "args.json")  # in every run folder: a new run would mix


def git_sha():
    """HEAD of the checkout this file lives in, whatever the working directory; None outside one."""
    cmd = ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def check_run_folder(out, marker="ckpt.pt", overwrite=False, script=None, outputs=()):
    """Refuse a folder holding `marker` (a run) or, given `script`, another script's args.json.
    With overwrite, return the old run's files (RUN_FILES, marker, outputs) for write_args."""
    if os.path.exists(out) and not os.path.isdir(out):  # found now, not after the run's work
        raise ValueError(f"{out}: --out names a file, not a folder")
    owner = script
    if script and os.path.exists(os.path.join(out, "args.json")):
        try:
            with open(os.path.join(out, "args.json")) as fh:
                owner = json.load(fh).get("script") or "an unknown script"
        except (ValueError, AttributeError):
            owner = "an unknown script"
    # the marker, or an output of a finished run whose marker was deleted (to save space)
    present = [name for name in (marker, *outputs) if os.path.exists(os.path.join(out, name))]
    if owner != script:
        what = f"a run of {owner} (its args.json); use another --out"
    else:  # only pretrain.py and detect.py (marker ckpt.pt) can continue a run
        what = f"a run ({present[0] if present else marker}); " + (
            "use --resume auto to continue it, another --out" if marker == "ckpt.pt"
            else "use another --out")
    if owner != script or present:
        if not overwrite:
            raise ValueError(f"{out}: already holds {what}, or --overwrite to replace it")
        old = {*RUN_FILES, marker, *outputs}
        return sorted(name for name in old if os.path.exists(os.path.join(out, name)))
    return []


def check_resume_flags(path, saved, args, keys):
    """A resume must be given the run's own flags: one error naming each of `keys` whose value in
    the checkpoint's args (`saved`) differs from `args`."""
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} in the checkpoint, {getattr(args, k)} now"
             for k in keys if saved.get(k) != getattr(args, k)]
    if diffs:
        raise ValueError(f"{path}: does not fit the flags: " + "; ".join(diffs))


def autocast(device, amp=True):
    """bf16 autocast on CUDA when `amp`; a no-op context on the CPU (slow bf16 matmuls there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@contextlib.contextmanager
def one_thread():
    """Torch on one thread inside the block, the caller's count restored after: for per-core
    figures, and for small ops (on a busy machine OpenMP's waiting made two threads 40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def folder_line(out):
    """A run's last line: the folder and every file in it, as it is on disk."""
    return f"wrote {out}: " + ", ".join(sorted(os.listdir(out)))


def write_args(out, args, script=None, clear=(), **extra):
    """args.json: the flags, the script, the code version and `extra` (world size, ...). First
    removes `clear` (check_run_folder's answer to --overwrite): call it once inputs are checked."""
    os.makedirs(out, exist_ok=True)
    for name in clear:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    record = dict(vars(args), script=script, git_sha=git_sha(), **extra)
    atomic_write(os.path.join(out, "args.json"), json.dumps(record, indent=1, default=str) + "\n")


class Progress:
    """One progress line: step/total, loss terms (`values`, in order, plus an optional "lr"), img/s,
    ms/step (the median of the log window), data ms, ETA (from the time per step so far), memory."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.start = total_steps, start_step
        self.t0 = time.monotonic()

    def line(self, step: int, values: dict, images_per_s: float, step_ms: float, data_ms: float,
             mem_gb: float | None = None) -> str:
        values = dict(values)
        lr = values.pop("lr", None)
        done = max(step - self.start, 1)  # resumed: only steps run here count towards the rate
        eta_min = int((time.monotonic() - self.t0) / done * max(self.total - step, 0) / 60)
        terms = " ".join(f"{k} {float(v):.4g}" for k, v in values.items())
        parts = [f"step {step}/{self.total}"] + ([terms] if terms else [])
        if lr is not None:
            parts.append(f"lr {float(lr):.1e}")
        rate = f"{images_per_s:.0f}" if images_per_s >= 10 else f"{images_per_s:.2g}"  # 1.1, not 1
        parts += [f"{rate} img/s", f"{step_ms:.0f} ms/step", f"data {data_ms:.0f} ms",
                  f"eta {eta_min // 60}h{eta_min % 60:02d}m"]
        if mem_gb is not None:
            parts.append(f"mem {mem_gb:.1f}G")
        return " | ".join(parts)


class JsonlWriter:
    """Append-only JSON-lines file: one object per call, flushed at once: a crash loses nothing."""

    def __init__(self, path):
        self.path = str(path)
        if os.path.dirname(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def write(self, record: dict) -> None:
        # default=float turns numpy/torch scalars (not JSON-serialisable) into plain floats
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop records after `step` (a resume redoes them) and a torn last line; say how many."""
        if not os.path.exists(self.path):
            return 0
        parsed, n_lines = self._parsed()
        keep = [line for line, record in parsed if record.get("step", 0) <= step]
        atomic_write(self.path, "".join(k + "\n" for k in keep))
        return n_lines - len(keep)

    def read(self) -> list:
        """The records written so far (a torn last line from a crash is left out)."""
        return [record for _, record in self._parsed()[0]]

    def _parsed(self):
        """([(line, record)] of the whole lines, number of lines); a torn last line is left out."""
        if not os.path.exists(self.path):
            return [], 0
        with open(self.path) as f:
            lines = f.read().splitlines()
        parsed = []
        for line in lines:
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue
        return parsed, len(lines)


# ---------------------------------------------------------- run figures: curves.png, confusion, ROC
CURVE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75)]


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def draw_curves(path, records, panels, baselines=None, title="", columns=3):
    """curves.png from metrics.jsonl records: a panel per (split, key) in `panels` that the records
    hold, the key against step in its own y range, baselines[key] (another key, e.g. the majority
    rate) dashed grey. Returns {key: (x0, y0, x1, y1, step_lo, step_hi, lo, hi)}: each panel's plot
    box in pixels and the data ranges mapped onto it (y up)."""
    baselines = baselines or {}
    W, H, m = 300, 170, 56  # panel size and its left margin (y labels), px
    series = []
    for split, key in panels:
        pts = [(r["step"], float(r[key])) for r in records
               if r.get("split") == split and _number(r.get(key))]
        ref = [(r["step"], float(r[baselines[key]])) for r in records
               if key in baselines and r.get("split") == split and _number(r.get(baselines[key]))]
        if pts:
            series.append((key, pts, ref))
    rows = max(1, -(-len(series) // columns))
    img = Image.new("RGB", (columns * W, rows * H + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    boxes = {}
    for n, (key, pts, ref) in enumerate(series):
        x0, y0 = (n % columns) * W + m, 30 + (n // columns) * H + 20
        x1, y1 = x0 + W - m - 15, y0 + H - m - 15
        steps, values = [p[0] for p in pts + ref], [p[1] for p in pts + ref]
        s_lo, s_hi = min(steps), max(steps)
        lo, hi = min(values), max(values)
        # a flat line is centred; relative, since 1e30 + 0.5 == 1e30
        if not hi - lo > 1e-12 * max(1.0, abs(lo), abs(hi)):
            pad = 0.5 * max(1.0, abs(hi))
            lo, hi = lo - pad, hi + pad
        if s_hi == s_lo:  # one record: its point in the middle of the panel
            s_lo, s_hi = s_lo - 1, s_hi + 1
        if len(ref) == 1:  # one baseline value: a line across the panel
            ref = [(s_lo, ref[0][1]), (s_hi, ref[0][1])]

        def px(s, v):  # data -> pixels
            x = x0 + (s - s_lo) / (s_hi - s_lo) * (x1 - x0)
            return x, y1 - (v - lo) / (hi - lo) * (y1 - y0)
        d.rectangle((x0 - 4, y0 - 6, x1 + 4, y1 + 6), outline="grey")  # outside: edge lines show
        d.text((x0, y0 - 20), key + (f" (dashed: {baselines[key]})" if ref else ""), fill="black")
        d.text((x0 - m + 4, y0 - 4), f"{hi:.3g}", fill="black")
        d.text((x0 - m + 4, y1 - 8), f"{lo:.3g}", fill="black")
        d.text((x0, y1 + 8), str(int(s_lo)), fill="black")
        d.text((x1 - 30, y1 + 8), str(int(s_hi)), fill="black")
        for (sa, va), (sb, vb) in zip(ref, ref[1:]):  # dashed: every other tenth of each segment
            for k in range(0, 10, 2):
                a, b = k / 10, (k + 1) / 10
                d.line([px(sa + a * (sb - sa), va + a * (vb - va)),
                        px(sa + b * (sb - sa), va + b * (vb - va))], fill=(150, 150, 150))
        colour = CURVE_COLOURS[n % len(CURVE_COLOURS)]
        if len(pts) == 1:
            cx, cy = px(*pts[0])
            d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        d.line([px(s, v) for s, v in pts], fill=colour, width=2)
        boxes[key] = (x0, y0, x1, y1, s_lo, s_hi, lo, hi)
    save_png(img, path)
    return boxes


def draw_confusion(confusion, title, path, classes="abcd", what="density"):
    """Counts in an N x N grid (rows true, columns predicted), shaded by the row (true class)
    fraction; classes: N short names; what: the axes' noun; the title may hold lines."""
    n, cell, pad, top = len(classes), 70, 90, 40 + 18 * title.count("\n")
    big, small = font(14), font(13)
    width = max(pad + n * cell + 20, title_width(title, big))  # a long title widens the figure
    img = Image.new("RGB", (width, top + pad + n * cell + 40), "white")
    d = ImageDraw.Draw(img)
    d.multiline_text((10, 8), title, fill="black", font=big)
    d.text((pad + n * cell // 2 - 50, top + pad + n * cell + 12), f"predicted {what}",
           fill="black", font=small)
    d.text((4, top + pad - 40), f"true {what}", fill="black", font=small)
    c = np.asarray(confusion, dtype=float)
    share = c / np.maximum(c.sum(1, keepdims=True), 1)
    for i in range(n):
        name = str(classes[i])[:8]
        d.text((pad + i * cell + (cell - d.textlength(name, font=small)) / 2, top + pad - 22),
               name, fill="black", font=small)
        d.text((pad - 4 - d.textlength(name, font=small), top + pad + i * cell + cell // 2 - 8),
               name, fill="black", font=small)
        for j in range(n):
            shade = int(255 - 200 * share[i, j])
            box = (pad + j * cell, top + pad + i * cell, pad + (j + 1) * cell,
                   top + pad + (i + 1) * cell)
            d.rectangle(box, fill=(shade, shade, 255), outline="grey")
            text = str(int(c[i, j]))
            d.text((box[0] + (cell - d.textlength(text, font=big)) / 2, box[1] + cell // 2 - 8),
                   text, fill="white" if shade < 128 else "black", font=big)
    save_png(img, path)


def font(size=14):
    """Pillow's own scalable font at `size` px (Pillow 10.1+ with FreeType), else its bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0's load_default takes no size
        return ImageFont.load_default()


def title_width(title, face):
    """Pixels a figure needs for `title` (lines allowed) drawn at (10, 8), with a margin."""
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((10, 8), title,
                                                                           font=face)[2]) + 10


ROC_TICKS = (0.0, 0.5, 1.0)  # both axes of roc.png: the corners and chance
ROC_SIDE, ROC_LEFT, ROC_TOP = 300, 80, 90  # plot square, margin left of it and above it, px


def roc_boxes(n_panels):
    """The plot square (x0, y0, x1, y1) of each of draw_roc's panels, in pixels."""
    width = ROC_LEFT + ROC_SIDE + 40  # a panel: y labels, the square, a gap
    return [(ROC_LEFT + n * width, ROC_TOP, ROC_LEFT + n * width + ROC_SIDE, ROC_TOP + ROC_SIDE)
            for n in range(n_panels)]


RADAR_RADIUS, RADAR_MARGIN = 200, 130  # px: the rim (value 1), and room for the axis labels


def radar_point(centre, k, n, value, radius=RADAR_RADIUS):
    """Pixel of `value` (0 at the centre, 1 on the rim) on axis k of n: axis 0 points up, the
    others follow clockwise, as in MammoDINO's Figure 2."""
    angle = -math.pi / 2 + 2 * math.pi * k / n
    r = radius * value  # px from the centre
    return centre[0] + r * math.cos(angle), centre[1] + r * math.sin(angle)


def draw_radar(axes, polygons, title, path):
    """radar.png: one axis per entry of `axes` (labels), rings at 0.25 .. 1, and one polygon per
    entry of `polygons` ({legend label: a value in [0, 1] per axis, None where it has none}), its
    vertices dotted, in CURVE_COLOURS order; the legend under the plot. -> the centre in pixels."""
    top = 40 + 18 * title.count("\n")
    side = 2 * (RADAR_RADIUS + RADAR_MARGIN)
    centre = (side // 2, top + side // 2)
    img = Image.new("RGB", (max(side, title_width(title, font(15))), top + side + 20 *
                            len(polygons) + 10), "white")
    d = ImageDraw.Draw(img)
    d.multiline_text((10, 8), title, fill="black", font=font(15))
    n = len(axes)
    for ring in (0.25, 0.5, 0.75, 1.0):  # circles: any number of axes, even one or two
        r = RADAR_RADIUS * ring
        d.ellipse((centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r), outline=(200,) * 3)
    for ring in (0.5, 1.0):  # the scale, beside axis 0, under the dots drawn later
        d.text((centre[0] + 4, centre[1] - RADAR_RADIUS * ring - 14), f"{ring:g}",
               fill=(150,) * 3, font=font(11))
    for k, label in enumerate(axes):
        d.line([centre, radar_point(centre, k, n, 1.0)], fill=(200,) * 3)
        x, y = radar_point(centre, k, n, 1.12)
        width = d.textlength(label, font=font(12))
        d.text((x - width / 2, y - 7), label, fill="black", font=font(12))
    points = {label: [radar_point(centre, k, n, v) for k, v in enumerate(values) if v is not None]
              for label, values in polygons.items()}
    for m, label in enumerate(points):  # outlines first: no line covers another polygon's dots
        if len(points[label]) > 1:
            d.line(points[label] + points[label][:1], fill=CURVE_COLOURS[m % len(CURVE_COLOURS)],
                   width=2)
    for m, label in enumerate(points):
        colour = CURVE_COLOURS[m % len(CURVE_COLOURS)]
        for x, y in points[label]:  # the values themselves, dotted: a test reads them back
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        y = top + side + 20 * m
        d.line((10, y + 7, 30, y + 7), fill=colour, width=3)
        d.text((36, y), label, fill=colour, font=font(13))
    save_png(img, path)
    return centre


def draw_roc(panels, title, path):
    """roc.png: a square panel per entry of `panels`, {panel title: {legend label: (fpr, tpr), or
    None for a year that has no curve}}, each curve in its own colour through the points given (as
    metrics.roc_curve returns them: steps, diagonal only across tied scores). Ticks and labels at
    0, 0.5 and 1 on both axes, axis names, the chance diagonal dashed, the legend under the square.
    -> roc_boxes(len(panels)), the plot squares in pixels."""
    boxes = roc_boxes(len(panels))
    legend_rows = max([len(c) for c in panels.values()] + [1])
    height = ROC_TOP + ROC_SIDE + 60 + 20 * legend_rows
    width = max(boxes[-1][2] + 40 if boxes else 0, title_width(title, font(15)))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.multiline_text((10, 8), title, fill="black", font=font(15))
    for (name, curves), box in zip(panels.items(), boxes):
        _roc_axes(img, d, box, name)
        x0, y0, x1, y1 = box

        def px(f, t):  # rates to pixels, y up
            return x0 + f * (x1 - x0), y1 - t * (y1 - y0)
        for n, (label, curve) in enumerate(curves.items()):
            colour = CURVE_COLOURS[n % len(CURVE_COLOURS)] if curve is not None else (120,) * 3
            if curve is not None:
                d.line([px(f, t) for f, t in zip(*curve)], fill=colour, width=2, joint="curve")
                d.line((x0 - 60, y1 + 52 + 20 * n + 7, x0 - 40, y1 + 52 + 20 * n + 7),
                       fill=colour, width=3)  # the legend's swatch
            d.text((x0 - 34, y1 + 52 + 20 * n), label, fill=colour, font=font(13))
    save_png(img, path)
    return boxes


def _roc_axes(img, d, box, name):
    """One ROC panel's frame: title, chance diagonal, ticks, tick labels, axis names."""
    x0, y0, x1, y1 = box
    small = font(13)
    d.text((x0, y0 - 24), name, fill="black", font=font(14))
    for k in range(0, 20, 2):  # the diagonal, dashed: every other twentieth
        a, b = k / 20, (k + 1) / 20
        d.line((x0 + a * (x1 - x0), y1 - a * (y1 - y0), x0 + b * (x1 - x0), y1 - b * (y1 - y0)),
               fill=(150, 150, 150), width=1)
    for t in ROC_TICKS:
        x, y = x0 + t * (x1 - x0), y1 - t * (y1 - y0)
        if 0 < t < 1:  # a faint grid line at chance helps read a curve off
            d.line((x, y0, x, y1), fill=(225, 225, 225))
            d.line((x0, y, x1, y), fill=(225, 225, 225))
        d.line((x, y1, x, y1 + 6), fill="black", width=2)  # x ticks, outside the square
        d.line((x0 - 6, y, x0, y), fill="black", width=2)  # y ticks
        text = f"{t:g}"
        w = d.textlength(text, font=small)
        d.text((x - w / 2, y1 + 9), text, fill="black", font=small)
        d.text((x0 - 10 - w, y - 8), text, fill="black", font=small)
    d.rectangle(box, outline="black")
    label = "false positive rate (1 - specificity)"
    d.text(((x0 + x1 - d.textlength(label, font=small)) / 2, y1 + 28), label, fill="black",
           font=small)
    label = "true positive rate (sensitivity)"
    side = Image.new("RGB", (int(d.textlength(label, font=small)) + 4, 18), "white")
    ImageDraw.Draw(side).text((2, 1), label, fill="black", font=small)
    side = side.rotate(90, expand=True)  # reads bottom to top, left of the tick labels
    img.paste(side, (x0 - 60, (y0 + y1 - side.height) // 2))


def rss_peak_mib(reset=False):
    """This process's peak resident memory since the last reset (Linux /proc; None elsewhere)."""
    try:
        if reset:
            open("/proc/self/clear_refs", "w").write("5")
        status = open("/proc/self/status")
        return int(next(l.split()[1] for l in status if l.startswith("VmHWM:"))) / 1024
    except OSError:
        return None
