"""The documentation stays true: links resolve, the README stays one screen with the two set-up
commands (the CI runs the test one verbatim), its picture exists and its quick start runs."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS]

RUN_COMMAND = "./install.sh && .venv/bin/python tools/train.py"
TEST_COMMAND = "./install.sh --dev && .venv/bin/python -m pytest -q"

FENCE = re.compile(r"^(```|~~~)")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_lines(path: Path, blank_code: bool = True) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code spans blanked out (``blank_code``)."""
    out, fenced = [], False
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((no, INLINE_CODE.sub("``", line) if blank_code else line))
    return out


def code_blocks(path: Path) -> list[tuple[str, str, str]]:
    """``(language, body, heading)`` of every fenced block; heading is the last ``##`` heading above it."""
    blocks, lang, body, heading = [], None, [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if lang is None:
            m = FENCE.match(line)
            if m:
                lang, body = line[3:].strip(), []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif FENCE.match(line):
            blocks.append((lang, "\n".join(body), heading))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"{path.name}: unclosed code block"
    return blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase; markup and punctuation dropped except hyphens,
    underscores and spaces; each space a hyphen."""
    text = re.sub(r"<[^>]+>", "", heading)                        # inline HTML
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)        # links: keep their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)                          # \w keeps letters, digits, _
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines_raw(path):
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def prose_lines_raw(path: Path) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, unchanged (headings keep their inline code for the slug)."""
    return prose_lines(path, blank_code=False)


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for no, line in prose_lines(path):
        for rx in (INLINE_LINK, HTML_LINK):
            found += [(no, m.group(1)) for m in rx.finditer(line)]
        m = REF_LINK.match(line)
        if m:
            found.append((no, m.group(1)))
    return found


def test_slug_rules():
    assert github_slug("Scoring + selection vs decode + resize") == "scoring--selection-vs-decode--resize"
    assert github_slug("The main job: `python tools/train.py`") == "the-main-job-python-toolstrainpy"
    assert github_slug("Attention backends (`attn_backend`)") == "attention-backends-attn_backend"
    assert github_slug("SAM ViT-B/16 at 1024 px") == "sam-vit-b16-at-1024-px"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    problems = []
    for no, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{no}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_docs_are_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(README) if not t.startswith("#")}
    missing = [d.name for d in DOCS if d.resolve() not in linked]
    assert not missing, f"docs pages without a link in README.md: {missing}"


def test_readme_is_one_screen_of_links():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 150


def test_readme_has_exactly_the_two_setup_commands():
    bash = [body.strip() for lang, body, _ in code_blocks(README) if lang in ("bash", "sh", "shell", "console")]
    assert bash == [RUN_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_test_command():
    lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    commands = [l for l in lines if l and not l.startswith("#") and not l.startswith("set ") and not l.startswith("cd ")]
    assert commands[0] == TEST_COMMAND  # then the linter configured in pyproject.toml
    assert commands[1:] == [".venv/bin/ruff check ."]


def test_readme_picture_exists_and_is_small():
    pictures = [t for _, t in links(README) if t.lower().endswith(".png")]
    assert pictures, "README.md shows no PNG"
    for t in pictures:
        path = ROOT / t
        assert path.is_file(), t
        assert path.stat().st_size < 300 * 1024, f"{t} is {path.stat().st_size} bytes"
        with Image.open(path) as im:
            assert im.width >= 400 and im.height >= 200


def test_no_test_counts_in_prose():
    pattern = re.compile(r"\b\d+\s+(?:passed|failed|skipped|tests?)\b", re.I)
    # docs/shards.md belongs to another change in flight; drop it from PENDING once it is clean
    pending = {"shards.md"}
    hits = [f"{p.relative_to(ROOT)}:{no}: {line.strip()}" for p in MARKDOWN if p.name not in pending
            for no, line in prose_lines(p) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_readme_quick_start_runs():
    blocks = [body for lang, body, heading in code_blocks(README) if lang == "python" and heading == "Quick start"]
    assert len(blocks) == 1, "README.md needs one python block under '## Quick start'"
    proc = subprocess.run([sys.executable, "-c", blocks[0]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_visualize_does_not_upscale_by_default(tmp_path):
    """The README picture's tool: 224-px images stay 224 px unless --size asks otherwise; the mosaic has a legend."""
    rng = np.random.default_rng(0)
    img = np.zeros((224, 224, 3), np.uint8)
    img[:, 112:] = rng.integers(0, 256, (224, 112, 3), dtype=np.uint8)  # plain left half, noisy right half
    src = tmp_path / "half_plain.png"
    Image.fromarray(img).save(src)
    out = tmp_path / "out"
    mosaic = tmp_path / "mosaic.png"
    cmd = [sys.executable, str(ROOT / "tools/visualize.py"), str(src), "--out", str(out), "--mosaic", str(mosaic)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(out / "half_plain.layout.png") as im:  # the 224-px layout, its caption and legend below
        assert 224 < im.height < 2 * 224 and 224 < im.width < 2 * 224 and np.asarray(im)[6:230, 6:230].std() > 0
    assert "224x224" in proc.stderr and "legend: 16 px untinted, 32 px blue, 64 px orange" in proc.stderr
    with Image.open(mosaic) as im:
        assert im.width >= 224 and im.height > 224 + 20  # caption and legend below the layout


# ------------------------------------------------------------------ docs/development.md's code layout
LAYOUT_FOLDERS = ("apt_data", "apt_model", "apt_train", "tools", "benchmarks", "studies", "examples")
LAYOUT_NAME = re.compile(r"(?<![\w/.])((?:\w+/)*\w+\.py)\b")


def layout_names() -> dict[str, set[str]]:
    """The ``.py`` paths the layout block names under each folder (``sources/base.py`` under apt_data)."""
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    block = text.split("## Layout of the code", 1)[1].split("```", 2)[1]
    named: dict[str, set[str]] = {f: set() for f in LAYOUT_FOLDERS}
    folder = None
    for line in block.splitlines():
        head = re.match(r"^([\w.]+)/?\s", line)
        if head:
            folder = head.group(1) if head.group(1) in LAYOUT_FOLDERS else None
            line = line[head.end():]
        if folder:
            named[folder].update(LAYOUT_NAME.findall(line))
    return named


def test_development_layout_names_every_module_and_nothing_else():
    missing, stale = [], []
    for folder, names in layout_names().items():
        files = {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py")
                 if p.name != "__init__.py" and "__pycache__" not in p.parts}
        missing += [f"{folder}/{f}" for f in sorted(files - names)]
        stale += [f"{folder}/{f}" for f in sorted(names - files)]
    assert not missing and not stale, (f"docs/development.md's layout block misses {missing or 'nothing'} "
                                       f"and names files that do not exist: {stale or 'none'}")
