"""Per-sample scores of a generated answer against its reference, and their means per target.

- ``exact_match``: 1 when answer and reference are equal after lower-casing and collapsing whitespace.
- ``answer_match``: ``--answer-pattern`` (a regex; its first group is the answer, the whole match when it
  has no group) is applied to both texts and the *last* match taken (a worked solution states its result
  at the end); two numbers compare numerically (``1,234`` = ``1234.0``; commas are thousands separators),
  anything else as normalised text. None when the reference has no match: that sample is not scorable and
  is left out of the mean; an answer without a match scores 0.
- ``rougeL`` (``rouge-score``, F-measure) and ``chrf`` (``sacrebleu``'s chrF, scaled to 0..1): maintained
  implementations, not hand-written ones. rouge-score's tokenizer keeps only ASCII letters and digits, so
  for other scripts chrF is the meaningful one.

Every per-target number is the mean of the per-sample scores written to ``eval_generations.jsonl``, so
the summary can be recomputed from that file.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

from phi3tune.errors import UsageError

TEXT_SCORES = ("exact_match", "answer_match", "rougeL", "chrf")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower-cased, whitespace collapsed to single spaces, stripped."""
    return _SPACE.sub(" ", text).strip().lower()


def compile_answer_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """``--answer-pattern``, compiled; a malformed regex is a usage error naming the problem."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--answer-pattern {pattern!r} is not a valid regular expression: {exc}.",
                         hint=r"e.g. --answer-pattern '####\s*(-?[\d,\.]+)' (quote it for the shell)") from None


def extract_answer(pattern: re.Pattern[str], text: str) -> str | None:
    """The last match's first group (or the whole match when the pattern has no group); None without a match."""
    found = None
    for match in pattern.finditer(text):
        value = match.group(1) if pattern.groups else match.group(0)
        if value is not None:
            found = value.strip()
    return found


def parse_number(text: str) -> Decimal | None:
    """``text`` as a number when it is one (``-1,234.50``, ``$5``, ``42.``), else None."""
    cleaned = text.strip().replace(",", "").removeprefix("$").rstrip(".")
    if not cleaned or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def answers_equal(answer: str, reference: str) -> bool:
    """Numerically equal when both are numbers, else equal after ``normalise``."""
    a, b = parse_number(answer), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalise(answer) == normalise(reference)


def answer_match(answer: str, reference: str, pattern: re.Pattern[str]) -> float | None:
    """1.0 / 0.0 whether the extracted answers agree; None when the reference has nothing to extract."""
    wanted = extract_answer(pattern, reference)
    if wanted is None:
        return None
    given = extract_answer(pattern, answer)
    return float(given is not None and answers_equal(given, wanted))


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@functools.lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def sample_scores(answer: str, reference: str, pattern: re.Pattern[str] | None) -> dict[str, float | None]:
    """Every text score of one answer (``answer_match`` only with a pattern)."""
    same = normalise(answer) == normalise(reference)
    scores: dict[str, float | None] = {
        "exact_match": float(same),
        "rougeL": float(_rouge().score(reference, answer)["rougeL"].fmeasure),
        # sacrebleu gives two empty strings 0; an empty answer to an empty reference is a perfect one.
        "chrf": 1.0 if same else float(_chrf().sentence_score(answer, [reference]).score) / 100,
    }
    if pattern is not None:
        scores["answer_match"] = answer_match(answer, reference, pattern)
    return scores


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarise(scores: Sequence[dict[str, Any]], stopped: Sequence[bool], new_tokens: Sequence[int]) -> dict[str, Any]:
    """Per-target means: the text scores, ``stopped_rate`` and ``mean_new_tokens``.

    ``answer_match_samples`` counts the samples whose reference the pattern matched (the mean's denominator).
    """
    out: dict[str, Any] = {key: _mean([s.get(key) for s in scores]) for key in TEXT_SCORES if any(key in s for s in scores)}
    if "answer_match" in out:
        out["answer_match_samples"] = sum(1 for s in scores if s.get("answer_match") is not None)
    out["stopped_rate"] = _mean([float(s) for s in stopped])
    out["mean_new_tokens"] = _mean([float(n) for n in new_tokens])
    out["n_samples"] = len(scores)
    return out


def difference(adapter: dict[str, Any], base: dict[str, Any], keys: Sequence[str]) -> dict[str, float | None]:
    """adapter minus base for each key (None where either side has no number)."""
    return {k: (adapter[k] - base[k] if isinstance(adapter.get(k), (int, float)) and isinstance(base.get(k), (int, float))
                else None) for k in keys}
