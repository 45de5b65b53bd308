"""A BEIR-layout dataset the flywheel was never tuned on: Debian's package descriptions.

    apt-get -o Acquire::Languages=en update        # once: fetches the English descriptions
    python benchmarks/debian_dataset.py DIR [--docs 6000] [--test 400] [--train 900]
    python benchmarks/end_to_end.py --dataset DIR --results DIR2

Each query is a package's one-line summary ("TLS encryption wrapper"), its one relevant document
the package's name and long description; lines of traffic come from the train queries, the test
split is held out. A second domain (software, not biomedicine), short queries, and a corpus of
any size up to ~25,000 documents: what ``benchmarks/end_to_end.py`` needs to show that a recipe
tuned on SciFact does not regress elsewhere. Library, development, documentation and debug
packages are left out, and so is any package whose summary or description repeats another's, so
each query has one right answer. The descriptions are Debian's (each under its package's
licence): build the folder locally, do not redistribute it. Stable: the same files in, the same
folder out (``--seed``).
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import re
import subprocess
import sys
from pathlib import Path

TRANSLATIONS = "/var/lib/apt/lists/*_debian_dists_*_main_i18n_Translation-en*"
SKIP = re.compile(r"(-dev|-doc|-dbg|-dbgsym|-data|-common|-examples|-tests?)$"
                  r"|^(lib|fonts-|texlive|golang-|node-|librust-|r-cran-|linux-)")


def read_descriptions(pattern: str = TRANSLATIONS) -> list[tuple[str, str, str]]:
    """(package, summary, long description) from apt's English description files."""
    files = sorted(f for f in glob.glob(pattern) if "security" not in f and "updates" not in f)
    if not files:
        sys.exit(f"no {pattern}: run `apt-get -o Acquire::Languages=en update` first")
    out = []
    for f in files:
        cat = ["lz4cat", f] if f.endswith(".lz4") else ["cat", f]
        text = subprocess.run(cat, capture_output=True, text=True, check=True).stdout
        for block in text.split("\n\n"):
            name = re.search(r"^Package: (\S+)$", block, re.M)
            desc = re.search(r"^Description-en: (.*)$((?:\n .*)*)", block, re.M)
            if name and desc:
                body = " ".join(l.strip() for l in desc.group(2).splitlines() if l.strip() not in ("", "."))
                out.append((name.group(1), desc.group(1).strip(), body))
    return out


def distinct(packages: list[tuple[str, str, str]], max_words: int = 220) -> list[tuple[str, str, str]]:
    """Packages with a substantial description that no other kept package shares (nor its summary)."""
    seen_body, seen_summary, keep = set(), set(), []
    for name, summary, body in packages:
        words = body.split()
        if SKIP.search(name) or len(words) < 30 or len(summary) < 15:
            continue
        if body[:120].lower() in seen_body or summary.lower() in seen_summary:
            continue
        seen_body.add(body[:120].lower())
        seen_summary.add(summary.lower())
        keep.append((name, summary, " ".join(words[:max_words])))
    return keep


def write_beir(out: Path, packages: list, n_test: int, n_train: int, seed: int) -> dict:
    rng = random.Random(seed)
    order = list(range(len(packages)))
    rng.shuffle(order)
    test, train = order[:n_test], order[n_test:n_test + n_train]
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, (name, _, body) in enumerate(packages):
            f.write(json.dumps({"_id": f"d{i}", "title": name, "text": body}) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for i in test + train:
            f.write(json.dumps({"_id": f"q{i}", "text": packages[i][1]}) + "\n")
    for split, ids in (("test", test), ("train", train)):
        with open(out / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in ids))
    return {"documents": len(packages), "test_queries": len(test), "train_queries": len(train)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--docs", type=int, default=6000)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--train", type=int, default=900)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    if a.test + a.train > a.docs:
        sys.exit(f"--test {a.test} + --train {a.train} queries need at least as many documents (--docs {a.docs})")
    packages = distinct(read_descriptions())
    random.Random(a.seed).shuffle(packages)
    if len(packages) < a.docs:
        print(f"only {len(packages)} distinct packages: --docs {a.docs} cut to {len(packages)}")
    counts = write_beir(a.out, packages[:a.docs], a.test, a.train, a.seed)
    print(json.dumps({"folder": str(a.out), **counts}))


if __name__ == "__main__":
    main()
