"""Build the bundled tasks that the default was not tuned on, from the data folder of
``tonyzhaozh/few-shot-learning`` (Apache-2.0; where sst2, trec and agnews came from):

- ``rte``: a sentence-pair task (premise, hypothesis -> True / False: entailment or not; RTE from
  SuperGLUE). Pool: its train split (2,490); test: its validation split (277), as the public test
  split has no labels. The prompt is the one of "Calibrate Before Use".
- ``trec50``: a many-label task, the same TREC questions with Li & Roth's 50 fine labels, each
  written as a readable label word (``NUM:dist`` -> ``distance``; the three "other" and two
  "description" classes are told apart by their coarse class). Pool: train (5,452); test: test (500).

    python scripts/make_tasks.py /work/.mirror/tonyzhaozh+few-shot-learning/repo emloc_agents/data/tasks
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

FINE = {  # Li & Roth (2002), coarse:fine -> label word
    "ABBR:abb": "abbreviation", "ABBR:exp": "expansion",
    "ENTY:animal": "animal", "ENTY:body": "body part", "ENTY:color": "color", "ENTY:cremat": "creative work",
    "ENTY:currency": "currency", "ENTY:dismed": "disease", "ENTY:event": "event", "ENTY:food": "food",
    "ENTY:instru": "instrument", "ENTY:lang": "language", "ENTY:letter": "letter", "ENTY:other": "other entity",
    "ENTY:plant": "plant", "ENTY:product": "product", "ENTY:religion": "religion", "ENTY:sport": "sport",
    "ENTY:substance": "substance", "ENTY:symbol": "symbol", "ENTY:techmeth": "technique", "ENTY:termeq": "term",
    "ENTY:veh": "vehicle", "ENTY:word": "word",
    "DESC:def": "definition", "DESC:desc": "description", "DESC:manner": "manner", "DESC:reason": "reason",
    "HUM:gr": "group", "HUM:ind": "individual", "HUM:title": "title", "HUM:desc": "person description",
    "LOC:city": "city", "LOC:country": "country", "LOC:mount": "mountain", "LOC:other": "other location",
    "LOC:state": "state",
    "NUM:code": "code", "NUM:count": "count", "NUM:date": "date", "NUM:dist": "distance", "NUM:money": "money",
    "NUM:ord": "order", "NUM:other": "other number", "NUM:perc": "percent", "NUM:period": "period",
    "NUM:speed": "speed", "NUM:temp": "temperature", "NUM:volsize": "size", "NUM:weight": "weight",
}


def read(repo: Path, path: str) -> str:
    """A file of the repository (a git directory: read at HEAD; a work tree: read from disk)."""
    if (repo / path).is_file():
        return (repo / path).read_text(encoding="utf-8", errors="replace")
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True, errors="replace").stdout


def write(folder: Path, spec: dict, pool: list[dict], test: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(spec, indent=1) + "\n")
    for name, rows in (("pool.jsonl", pool), ("test.jsonl", test)):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{folder}: {len(pool)} pool, {len(test)} test, {len(spec['labels'])} labels")


def rte(repo: Path, out: Path) -> None:
    def rows(path: str) -> list[dict]:
        got = []
        for line in read(repo, path).splitlines():
            r = json.loads(line)
            got.append({"text": {"premise": r["premise"], "hypothesis": r["hypothesis"]},
                        "label": "True" if r["label"] == "entailment" else "False"})
        return got

    spec = {"name": "rte", "description": "RTE textual entailment (SuperGLUE), sentence pairs, 2 classes.",
            "instruction": "Say whether the premise entails the statement.",
            "input_template": "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", "labels": ["True", "False"]}
    write(out / "rte", spec, rows("data/rte/train.jsonl"), rows("data/rte/val.jsonl"))


def trec50(repo: Path, out: Path) -> None:
    def rows(path: str) -> list[dict]:
        got = []
        for line in read(repo, path).splitlines():
            label, text = line.strip().split(" ", 1)
            got.append({"text": text, "label": FINE[label]})
        return got

    spec = {"name": "trec50", "description": "TREC question classification, 50 fine labels (Li & Roth 2002).",
            "instruction": "Classify the fine-grained type of answer the question asks for.",
            "input_template": "Question: {text}\nAnswer type:", "labels": list(FINE.values())}
    write(out / "trec50", spec, rows("data/trec/train.txt"), rows("data/trec/test.txt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo", type=Path, help="a copy of tonyzhaozh/few-shot-learning (work tree or git directory)")
    ap.add_argument("out", type=Path, help="the folder of task folders (emloc_agents/data/tasks)")
    args = ap.parse_args()
    rte(args.repo, args.out)
    trec50(args.repo, args.out)


if __name__ == "__main__":
    main()
