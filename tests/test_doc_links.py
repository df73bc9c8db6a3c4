"""Relative links in the READMEs and guides point at files of the repository,
and the porting guide is reachable from the root README and avalon-layers'."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted({ROOT / "README.md", *ROOT.glob("packages/*/README.md"), *ROOT.glob("packages/*/PORTING.md")})
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s) and other schemes
        assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


def test_the_porting_guide_is_linked():
    guide = "packages/avalon-layers/PORTING.md"
    assert (ROOT / guide).is_file()
    assert f"]({guide})" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](PORTING.md)" in (ROOT / "packages/avalon-layers/README.md").read_text(encoding="utf-8")
