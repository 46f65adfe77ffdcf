"""Write zsgd's embedded text corpus from Debian's ``bible-kjv-text`` package.

    apt-get install bible-kjv bible-kjv-text
    python3 scripts/make_text_corpus.py          # -> zsgd/data/embedded/kjv-genesis-ruth.txt

Why this text: the King James Version (1611) is in the public domain (the
package's copyright file: "The copyright for the King James Version text of
the Bible is expired"), it is packaged by Debian so it can be rebuilt on any
machine without a download, and its first eight books (Genesis to Ruth,
about 1.0 MB, 72 distinct characters) are enough for a character model to
learn visibly in minutes. Output: one verse per line without verse numbers,
a blank line and a "Book N" line before every chapter. Deterministic: the
same package version gives the same bytes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "zsgd" / "data" / "embedded" / "kjv-genesis-ruth.txt"
RANGE = "Ge1:1-Ru4:22"


def convert(raw: str) -> str:
    """``bible`` output (numbered, wrapped verses) -> one unnumbered verse per line."""
    out: list[str] = []
    for line in raw.split("\n"):
        verse = re.match(r"^\s+(\d+) (.*)$", line)
        if verse:
            out.append(verse.group(2))
        elif re.match(r"^[1-3A-Z][A-Za-z ]+ \d+$", line):
            out += ["", line]
        elif line.strip():
            out[-1] += " " + line.strip()
    return "\n".join(out).strip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--range", default=RANGE, help="verse range for the 'bible' program")
    args = ap.parse_args()
    raw = subprocess.run(["bible", args.range], check=True, capture_output=True, text=True).stdout
    text = convert(raw)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text.encode())} bytes, {len(set(text))} distinct characters")


if __name__ == "__main__":
    main()
