"""``tinkops validate`` on the corpus: good repositories pass, each bad file is reported.

``corpus/good/`` is a complete repository in the shapes of Tinkerbell's published hardware
documents and templates. Each file under ``corpus/bad/<folder>/`` is one mistake: it is
added to a copy of the good repository at ``<folder>/<file>``, and ``tinkops validate``
must exit 1 and print its problem. The expectation sits in the file's first line,
``# expect: LINE: FRAGMENT``, or in ``<file>.expect`` for JSON files. LINE is a line of the
bad file, ``-`` when the problem has no line, or ``path:LINE`` when the problem is reported
on another file (a request whose rendering fails at a template line).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "corpus"
GOOD = CORPUS / "good"
BAD = CORPUS / "bad"
REPO_LAYOUT = Path(__file__).parents[2] / "repo-layout"
_EXPECT = re.compile(
    r"^(?:# expect: )?(?:(?P<file>[^\s:]+/[^\s:]+):)?(?P<line>\d+|-): (?P<text>.+)$"
)


@dataclass(frozen=True)
class Case:
    path: Path
    file: str
    line: int | None
    fragment: str

    @property
    def id(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def load_case(path: Path) -> Case:
    sidecar = path.with_name(path.name + ".expect")
    first = (sidecar if sidecar.exists() else path).read_text().splitlines()[0]
    match = _EXPECT.match(first)
    assert match, f"{path} has no expectation line"
    file = match.group("file") or f"{path.parent.name}/{path.name}"
    line = None if match.group("line") == "-" else int(match.group("line"))
    return Case(path, file, line, match.group("text"))


CASES = [
    load_case(path)
    for path in sorted(BAD.glob("*/*"))
    if path.is_file() and not path.name.endswith(".expect")
]


def validate(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tinkops.cli", "validate", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run the real CLI once per bad case, a few at a time, so the table stays fast."""
    folders = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp("case")
        shutil.copytree(GOOD, folder, dirs_exist_ok=True)
        shutil.copy(case.path, folder / case.path.parent.name / case.path.name)
        folders[case.id] = folder
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(zip(folders, pool.map(validate, folders.values()), strict=True))
    return runs


def test_corpus_large_enough() -> None:
    good = [p for p in GOOD.glob("*/*") if p.is_file()]
    assert len(CASES) >= 40
    assert len(good) >= 10


@pytest.mark.parametrize("folder", [GOOD, REPO_LAYOUT], ids=["corpus-good", "repo-layout"])
def test_good_repository_clean(folder: Path) -> None:
    result = validate(folder)
    assert result.stdout == ""
    assert result.returncode == 0, result.stderr
    assert "no problems" in result.stderr


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_case_reported(
    case: Case, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = results[case.id]
    prefix = f"{case.file}:{case.line}: " if case.line else f"{case.file}: "
    reported = [line for line in result.stdout.splitlines() if line.startswith(prefix)]

    assert result.returncode == 1, result.stdout + result.stderr
    assert reported, f"nothing reported at {prefix!r}:\n{result.stdout}"
    assert any(case.fragment in line for line in reported), result.stdout
    assert "problem" in result.stderr
