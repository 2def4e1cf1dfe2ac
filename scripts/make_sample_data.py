"""Generate the bundled demo datasets (phi3tune/sample_data/*.jsonl) deterministically.

The task is 3-word reversal ("Reverse these words: apple river stone" → "stone river apple") over
62 common English words that are single tokens for the Phi-3 tokenizer: simple enough that a tiny
random Phi-3 (hidden 512, 2 layers) visibly learns it in ~100 steps (docs/design.md, "Tests without the internet"). About a quarter
of the rows carry a system turn so that rendering with and without one is exercised.

Run: python scripts/make_sample_data.py   (rewrites the files byte for byte identically)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 400
N_EVAL = 40
WORDS_PER_ROW = 3
SYSTEM_SHARE = 0.25
SYSTEM_PROMPT = "You reverse the order of the words you are given."
OUT_DIR = Path(__file__).resolve().parents[1] / "phi3tune" / "sample_data"
WORDS = (
    "apple river stone cloud bear house green music water light bread chair table window garden summer "
    "winter dog cat bird fish tree flower moon sun star road city paper book pen door horse train ship "
    "sea snow rain fire wind gold silver milk egg bell lamp king queen field hill lake forest ocean sugar "
    "salt coffee tea ring coat hat box cup"
).split()


def make_rows(rng: random.Random, n: int, used: set[tuple[str, ...]]) -> list[dict]:
    """Draw ``n`` rows whose word tuples are not in ``used`` (which is updated)."""
    rows = []
    while len(rows) < n:
        words = tuple(rng.sample(WORDS, WORDS_PER_ROW))
        if words in used:
            continue
        used.add(words)
        messages = [
            {"role": "user", "content": "Reverse these words: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]
        if rng.random() < SYSTEM_SHARE:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON Lines with a trailing newline."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    """Write sample_chat.jsonl (train) and sample_chat_eval.jsonl (disjoint word triples)."""
    assert len(set(WORDS)) == len(WORDS)
    rng = random.Random(SEED)
    used: set[tuple[str, ...]] = set()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT_DIR / "sample_chat.jsonl", make_rows(rng, N_TRAIN, used))
    write_jsonl(OUT_DIR / "sample_chat_eval.jsonl", make_rows(rng, N_EVAL, used))


if __name__ == "__main__":
    main()
