"""The EDIS section (diffusion model, energies, guided sampler, cycle) is the same text in both
single-file scripts: a fix made in one and forgotten in the other must fail here."""
import difflib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRIPTS = ("edis_iql.py", "edis_calql.py")


def edis_section(name: str) -> list[str]:
    """Lines strictly between the marker comment lines "# EDIS begin..." and "# EDIS end..." (the begin
    line itself mentions "EDIS end" in its text, so markers are matched at the start of a comment)."""
    lines = (ROOT / name).read_text().splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if re.match(r"\s*#\s*EDIS begin\b", line)]
    ends = [i for i, line in enumerate(lines) if re.match(r"\s*#\s*EDIS end\b", line)]
    assert len(begins) == 1, f"{name}: {len(begins)} '# EDIS begin' marker lines, expected exactly 1"
    assert len(ends) == 1, f"{name}: {len(ends)} '# EDIS end' marker lines, expected exactly 1"
    assert begins[0] < ends[0], f"{name}: 'EDIS end' (line {ends[0] + 1}) comes before 'EDIS begin' (line {begins[0] + 1})"
    return lines[begins[0] + 1:ends[0]]


def test_edis_sections_are_identical():
    """Catches an EDIS change made in one script only (and a missing or duplicated marker)."""
    iql, calql = (edis_section(name) for name in SCRIPTS)
    if iql != calql:
        diff = "".join(difflib.unified_diff(iql, calql, fromfile="edis_iql.py [EDIS]", tofile="edis_calql.py [EDIS]"))
        pytest.fail(f"the EDIS sections of edis_iql.py and edis_calql.py differ:\n{diff}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_edis_section_is_the_real_thing(name):
    """Catches markers moved around an empty or partial block (which would make the identity test
    above vacuous): the section holds the whole EDIS machinery."""
    text = "".join(edis_section(name))
    for needle in ("class EDISArgs", "class Denoiser", "def heun_sample", "class Energies", "def info_nce",
                   "class EDIS", "def cycle", "def guide", "def inpaint"):
        assert needle in text, f"{name}: '{needle}' is not inside the EDIS section"
    assert len(text.splitlines()) > 200
