"""The README stays short and true: every `file.function` its "Where each idea lives" table names exists, the table
covers each method component of both papers, every docs/ page it links exists, every script it runs exists, every
command in it and in docs/ gets past its script's argument parser, and the file map lists every top-level .py file.

README is a module variable, so a test (see the last one) can point these checks at a copy."""
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_CHARS = 14_500  # prose and tables: the 2-D benchmarks' table and the CLAHE figures took it past 12,000
# one keyword per component the table must cover (matched, case-insensitive, against a row's first cell)
COMPONENTS = {
    "DINO loss and centering": "dino loss",
    "Sinkhorn-Knopp": "sinkhorn",
    "iBOT": "ibot",
    "KoLeo": "koleo",
    "the EMA teacher and its schedule": "ema teacher",
    "multi-crop": "multi-crop",
    "tissue-aware crops and masking": "tissue-aware",
    "the adjacent-slice loss": "adjacent-slice",
    "CLAHE": "clahe",
    "reading one slice": "one slice",
    "exam aggregation": "exam aggregation",
    "the cumulative-hazard risk head": "risk head",
    "the pyramid + RetinaNet": "retinanet",
    "3-D candidates": "3-d candidates",
    "the DBTex FROC": "froc",
    "bootstrap": "bootstrap",
    "DeLong": "delong",
    "McNemar": "mcnemar",
}
FILE_SUFFIXES = {"py", "md", "txt", "csv", "json", "jsonl", "png", "pth", "pt", "dcm"}  # `x.py` names a file
NAME = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)`")


def text():
    return README.read_text(encoding="utf-8")


def idea_table(readme):
    """Rows (lists of cells) of the table under the "Where each idea lives" heading, header and rule left out."""
    m = re.search(r"^#+ Where each idea lives\s*$", readme, re.MULTILINE)
    assert m, f"{README.name}: no 'Where each idea lives' heading"
    lines = readme[m.end():].strip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    assert len(rows) > 2 and set(rows[1][0]) <= set("-: "), f"{README.name}: no table under 'Where each idea lives'"
    return rows[2:]


def table_names(readme):
    """Every backticked module.attr (or module.Class.method) in the table, with the idea it belongs to."""
    return [(row[0], name) for row in idea_table(readme) for cell in row[1:] for name in NAME.findall(cell)
            if name.rsplit(".", 1)[1] not in FILE_SUFFIXES]


def missing_names(readme):
    """'module.attr (idea)' for each table name that is not importable as written."""
    missing = []
    for idea, name in table_names(readme):
        module, *attrs = name.split(".")
        if not (ROOT / f"{module}.py").is_file():
            missing.append(f"{name} ({idea}: no {module}.py)")
            continue
        obj = importlib.import_module(module)
        for attr in attrs:
            if not hasattr(obj, attr):
                missing.append(f"{name} ({idea}: no attribute {attr!r})")
                break
            obj = getattr(obj, attr)
    return missing


def test_readme_is_short():
    n = len(text())
    assert n <= MAX_CHARS, f"{README.name} is {n} characters, more than {MAX_CHARS}"


def test_every_name_in_the_table_exists():
    names = table_names(text())
    assert len(names) >= len(COMPONENTS), f"only {len(names)} backticked file.function names in the table"
    missing = missing_names(text())
    assert not missing, "the 'Where each idea lives' table names what the code lacks: " + "; ".join(missing)


def test_the_table_covers_each_component_with_a_section_and_code():
    rows = idea_table(text())
    for component, keyword in COMPONENTS.items():
        found = [r for r in rows if keyword in r[0].lower()]
        assert found, f"no row for {component} (a first cell containing {keyword!r})"
        for r in found:
            assert len(r) >= 3 and re.search(r"§\s*\d|MammoDINO", r[1]), f"row {r[0]!r}: no paper section in {r[1]!r}"
            assert NAME.search(r[2]), f"row {r[0]!r}: no `file.function` in {r[2]!r}"


def test_docs_links_point_to_files():
    readme = text()
    linked = set(re.findall(r"\]\((docs/[^)\s#]+)", readme)) | set(re.findall(r"\bdocs/[\w.-]+\.md\b", readme))
    assert linked, "the README links no docs/ page"
    missing = sorted(p for p in linked if not (ROOT / p).is_file())
    assert not missing, f"the README links missing pages: {missing}"


def test_commands_name_existing_scripts():
    readme = text()
    scripts = set(re.findall(r"\bpython3?\s+(\S+\.py)\b", readme))
    scripts |= set(re.findall(r"\btorchrun\b[^\n]*?\s(\S+\.py)\b", readme))
    assert {"pretrain.py", "probe.py", "detect.py"} <= scripts, sorted(scripts)
    missing = sorted(s for s in scripts if not (ROOT / s).is_file()
                     or 'if __name__ == "__main__":' not in (ROOT / s).read_text(encoding="utf-8"))
    assert not missing, f"the README runs scripts that do not exist or have no command line: {missing}"


def commands(markdown):
    """(script, argv) of every `python X.py ...` and `torchrun ... X.py ...` in the page's bash blocks and inline
    code; continuation lines joined, comments and `&&` chains split off."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`((?:python3?|torchrun) [^`]*\.py[^`]*)`", markdown)
    found = []
    for line in lines:
        for part in re.split(r"&&|;", re.sub(r"(^|\s)#.*", "", line)):
            words = shlex.split(part)
            if len(words) > 1 and words[0] in ("python", "python3") and words[1].endswith(".py"):
                found.append((words[1], words[2:]))
            elif words and words[0] == "torchrun":
                i = next(k for k, w in enumerate(words) if w.endswith(".py"))
                found.append((words[i], words[i + 1:]))
    return found


def test_commands_parse(tmp_path, monkeypatch):
    """Every command in the README and docs/ is accepted by its script's argument parser (a renamed subcommand or
    flag fails here, naming the page and the command)."""
    import torch
    pages = [README] + sorted((ROOT / "docs").glob("*.md"))
    monkeypatch.chdir(tmp_path)  # argument parsing should write nothing; if it did, not into the repo
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parse the GPU commands as on a GPU machine
    bad, n = [], 0
    for page in pages:
        for script, argv in commands(page.read_text(encoding="utf-8")):
            n += 1
            try:
                importlib.import_module(script[:-3]).get_args(argv)
            except SystemExit as e:  # --help exits 0
                if e.code:
                    bad.append(f"{page.name}: python {script} {' '.join(argv)} (exit {e.code})")
    assert n >= 15, f"only {n} commands found"
    assert not bad, "commands their scripts refuse: " + "; ".join(bad)


def test_file_map_lists_every_module():
    readme = text()
    files = readme[readme.index("## Files"):readme.index("## Where each idea lives")]
    absent = sorted(p.name for p in ROOT.glob("*.py") if f"`{p.name}`" not in files)
    assert not absent, f"the README's file map leaves out {absent}"


def test_a_wrong_name_fails(tmp_path, monkeypatch):
    """The checks above catch a name the code lacks: plant one in a copy of the README."""
    readme = text()
    row = next(line for line in readme.splitlines() if line.startswith("| KoLeo"))
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(row, row.replace("`pretrain.koleo_loss`", "`pretrain.koleo_loss_v2`")))
    monkeypatch.setattr(sys.modules[__name__], "README", copy)
    with pytest.raises(AssertionError, match=r"pretrain\.koleo_loss_v2 \(KoLeo: no attribute 'koleo_loss_v2'\)"):
        test_every_name_in_the_table_exists()
