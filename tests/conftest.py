"""Lets plain `pytest` (not only `python -m pytest`) import the repo's flat modules from any working directory."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
