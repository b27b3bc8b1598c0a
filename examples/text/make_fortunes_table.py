"""Build a labelled text table from the Debian package `fortunes` (apt-get install fortunes).

    python examples/text/make_fortunes_table.py data/fortunes.parquet [--categories food love linux] [--max-chars 300]

Each file /usr/share/games/fortunes/<category> holds entries separated by lines holding only `%`.
The table has one row per entry: `text` (the entry, whitespace kept), `label` (the category name) and
`source` (`fortunes/<category>`, carried to data/scores/scores.parquet). Entries longer than
--max-chars (long dialogues, poems) and empty ones are dropped; duplicates within a category too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ["food", "love", "linux"]


def entries(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    out, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            out.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    out.append("\n".join(current).strip())
    return out


def build(categories: list[str], max_chars: int, root: Path = FORTUNES) -> pa.Table:
    rows = {"text": [], "label": [], "source": []}
    for category in categories:
        path = root / category
        if not path.is_file():
            sys.exit(f"{path}: not found (apt-get install fortunes; categories are the files in {root})")
        seen = set()
        for entry in entries(path):
            if not entry or len(entry) > max_chars or entry in seen:
                continue
            seen.add(entry)
            rows["text"].append(entry)
            rows["label"].append(category)
            rows["source"].append(f"fortunes/{category}")
    return pa.table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the Parquet file to write (e.g. data/fortunes.parquet)")
    parser.add_argument("--categories", nargs="+", default=CATEGORIES, help=f"default: {' '.join(CATEGORIES)}")
    parser.add_argument("--max-chars", type=int, default=300, help="drop longer entries (default 300)")
    parser.add_argument("--root", type=Path, default=FORTUNES, help=f"default: {FORTUNES}")
    args = parser.parse_args(argv)
    table = build(args.categories, args.max_chars, args.root)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    counts = {c: table.column("label").to_pylist().count(c) for c in args.categories}
    print(f"{args.out}: {table.num_rows} texts ({', '.join(f'{c} {n}' for c, n in counts.items())})")


if __name__ == "__main__":
    main()
