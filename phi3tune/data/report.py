"""What data preparation did to each split: rows read, skipped (and why, with the first row numbers), truncated,
dropped, tokens and trained share, and the data fingerprint that ``--resume`` compares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from phi3tune.data.validate import rows_shown


@dataclass
class SourceReport:
    """What happened to the rows of one split."""

    source: str
    format: str
    unit: str = "row"
    rows_read: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    invalid_first_rows: dict[str, list[int]] = field(default_factory=dict)
    rows_used: int = 0
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    @property
    def trained_share(self) -> float:
        """Fraction of the kept tokens that carry a label."""
        return self.trained_tokens / self.tokens if self.tokens else 0.0


@dataclass
class DataReport:
    """Statistics of a prepared dataset; ``fingerprint`` is a sha256 over the normalised conversations."""

    train: SourceReport
    eval: SourceReport | None
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for run_config.yaml."""
        out = {"fingerprint": self.fingerprint, "train": asdict(self.train)}
        out["train"]["trained_share"] = round(self.train.trained_share, 4)
        if self.eval is not None:
            out["eval"] = {**asdict(self.eval), "trained_share": round(self.eval.trained_share, 4)}
        return out

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the run log."""
        lines = []
        for name, r in (("train", self.train), ("eval", self.eval)):
            if r is None:
                continue
            lines.append(
                f"{name}: {r.source} ({r.format}): {r.rows_read} rows read, {r.rows_used} used, "
                f"{r.tokens} tokens ({r.trained_share:.0%} trained)"
            )
            for problem, n in r.invalid.items():
                first = ", ".join(map(str, r.invalid_first_rows[problem]))
                more = ", …" if n > rows_shown(problem) else ""
                lines.append(f"  skipped {n} invalid ({problem}): {r.unit}s {first}{more}")
            for what, n in (("truncated", r.truncated), ("dropped: over max_length", r.dropped_overlength),
                            ("dropped: no trained tokens", r.dropped_no_labels)):  # fmt: skip
                if n:
                    lines.append(f"  {what}: {n}")
        lines.append(f"data fingerprint: {self.fingerprint}")
        return lines
