"""Per-run cache statistics: what each step did, what it cost, what the caches hold.

Example:
    >>> stats = CacheStatistics()
    >>> stats.add(StepRecord(run=0, step=0, branch=0, kind="full", indicator=None, error=0.0,
    ...     blocks_computed=4, blocks_total=4, tokens_computed=64, tokens_total=64,
    ...     flops=100, flops_full=100, reason="warm-up"))
    >>> stats.summary()["full"]
    1
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .observers import EngineObserver


@dataclass
class StepRecord:
    """One transformer call (one step of one guidance branch)."""

    run: int
    step: int
    branch: int
    kind: str
    indicator: float | None
    error: float
    blocks_computed: int
    blocks_total: int
    tokens_computed: int  # image-token rows pushed through blocks, summed over blocks
    tokens_total: int  # the same for a full step
    flops: int
    flops_full: int
    reason: str = ""
    blocks_mask: list[int] | None = None
    token_count: int = 0  # image tokens refreshed per sample (token steps)
    #: per-sample decisions (``per_sample=True``), per batch row: the kind each row ran (``kind``
    #: is then the heaviest of them), its sample's indicator, its whole-depth block mask
    sample_kinds: list[str] | None = None
    sample_indicators: list[float | None] | None = None
    sample_masks: list[list[int] | None] | None = None


@dataclass
class CacheStatistics(EngineObserver):
    """Everything the engine records; :meth:`summary` and :meth:`table` read it. It is the
    engine's last observer: each call's record, the bytes the caches hold and the collectives.

    ``runs`` can be restricted with ``run=`` (the default everywhere is the last run).
    """

    records: list[StepRecord] = field(default_factory=list)
    cache_bytes: dict[str, int] = field(default_factory=dict)
    collectives: int = 0
    collective_bytes: int = 0
    bookkeeping_seconds: float = 0.0

    def add(self, rec: StepRecord) -> None:
        self.records.append(rec)

    def on_call_end(self, engine: Any, record: StepRecord) -> None:
        self.add(record)
        self.cache_bytes = engine.cache_bytes()
        self.collectives = engine.sync.collectives
        self.collective_bytes = engine.sync.bytes_sent

    @property
    def last_run(self) -> int:
        return self.records[-1].run if self.records else -1

    def run_records(self, run: int | None = None) -> list[StepRecord]:
        run = self.last_run if run is None else run
        return [r for r in self.records if r.run == run]

    def decision_log(self, run: int | None = None) -> list[tuple]:
        """Per step of branch 0: ``(kind, blocks mask, tokens per sample)``: what ranks must agree
        on; with per-sample decisions, followed by each row's ``(kind, blocks mask)``."""
        return [
            (r.kind, tuple(r.blocks_mask or ()), r.token_count)
            + (() if r.sample_kinds is None else (self._sample_log(r),))
            for r in self.run_records(run)
            if r.branch == 0
        ]

    @staticmethod
    def _sample_log(r: StepRecord) -> tuple:
        masks = r.sample_masks or [None] * len(r.sample_kinds or ())
        return tuple((k, tuple(m or ())) for k, m in zip(r.sample_kinds or (), masks, strict=True))

    def sample_kinds(self, run: int | None = None) -> list[list[str]]:
        """Per batch row, the kinds it ran at each step of branch 0 (per-sample decisions; empty
        otherwise).

        Example:
            >>> s = CacheStatistics()
            >>> s.add(StepRecord(run=0, step=0, branch=0, kind="full", indicator=None, error=0.0,
            ...     blocks_computed=4, blocks_total=4, tokens_computed=64, tokens_total=64,
            ...     flops=100, flops_full=100, sample_kinds=["full", "skip"]))
            >>> s.sample_kinds()
            [['full'], ['skip']]
        """
        steps = [r.sample_kinds for r in self.run_records(run) if r.branch == 0 and r.sample_kinds]
        if not steps:
            return []
        return [[kinds[row] for kinds in steps] for row in range(len(steps[0]))]

    def summary(self, run: int | None = None) -> dict[str, Any]:
        recs = self.run_records(run)
        steps = [r for r in recs if r.branch == 0]
        out: dict[str, Any] = {
            k: sum(1 for r in steps if r.kind == k) for k in ("skip", "block", "token", "full")
        }
        out["steps"] = len(steps)
        out["calls"] = len(recs)
        blocks_total = sum(r.blocks_total for r in recs)
        tokens_total = sum(r.tokens_total for r in recs)
        flops_full = sum(r.flops_full for r in recs)
        out["blocks_computed"] = sum(r.blocks_computed for r in recs)
        out["blocks_total"] = blocks_total
        out["tokens_computed"] = sum(r.tokens_computed for r in recs)
        out["tokens_total"] = tokens_total
        out["flops_computed"] = sum(r.flops for r in recs)
        out["flops_full"] = flops_full
        out["flops_fraction"] = out["flops_computed"] / flops_full if flops_full else 1.0
        out["theoretical_speedup"] = (
            1.0 / out["flops_fraction"] if out["flops_fraction"] > 0 else float("inf")
        )
        out["cache_bytes"] = dict(self.cache_bytes)
        out["cache_bytes_total"] = sum(self.cache_bytes.values())
        out["collectives"] = self.collectives
        out["collective_bytes"] = self.collective_bytes
        out["bookkeeping_seconds"] = self.bookkeeping_seconds
        out["indicators"] = [r.indicator for r in steps]
        out["kinds"] = [r.kind for r in steps]
        return out

    def table(self, run: int | None = None) -> str:
        """A printable table: one line per step, then the totals."""
        lines = [
            f"{'step':>4} {'kind':<5} {'indicator':>10} {'error':>8} {'blocks':>7} {'tokens':>9} {'FLOPs':>6}"
        ]
        for r in self.run_records(run):
            if r.branch:
                continue
            ind = "-" if r.indicator is None else f"{r.indicator:.4f}"
            frac = r.flops / r.flops_full if r.flops_full else 1.0
            lines.append(
                f"{r.step:>4} {r.kind:<5} {ind:>10} {r.error:>8.4f} "
                f"{r.blocks_computed:>3}/{r.blocks_total:<3} {r.tokens_computed / max(r.tokens_total, 1):>8.0%} "
                f"{frac:>6.0%}"
            )
        s = self.summary(run)
        lines.append(
            f"steps {s['steps']}: full {s['full']}, block {s['block']}, token {s['token']}, skip {s['skip']} | "
            f"FLOPs computed {s['flops_fraction']:.1%} (theoretical {s['theoretical_speedup']:.2f}x) | "
            f"cache {s['cache_bytes_total'] / 2**20:.2f} MiB | collectives {s['collectives']}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "records": [asdict(r) for r in self.records]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The statistics as indented JSON (:meth:`to_dict`), written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def combined(cls, parts: dict[str, CacheStatistics]) -> CacheStatistics:
        """One view of a run served by several transformers (Wan 2.2 A14B's two experts, from
        :func:`~xslim_xdit.api.get_engines`): the last run of each part, its records in step and
        branch order (numbered as one run, that of the first part), cache bytes, collectives and
        bookkeeping time added up. Each step was served by one part, so :meth:`summary` counts
        every step once.

        Example:
            >>> def rec(step, kind):
            ...     return StepRecord(run=0, step=step, branch=0, kind=kind, indicator=None, error=0.0,
            ...         blocks_computed=4, blocks_total=4, tokens_computed=64, tokens_total=64,
            ...         flops=100 if kind == "full" else 0, flops_full=100)
            >>> high, low = CacheStatistics([rec(0, "full"), rec(1, "skip")]), CacheStatistics([rec(2, "full")])
            >>> CacheStatistics.combined({"transformer": high, "transformer_2": low}).summary()["kinds"]
            ['full', 'skip', 'full']
        """
        parts_list = list(parts.values())
        if not parts_list:
            raise ValueError("parts: at least one CacheStatistics")
        run = parts_list[0].last_run
        records = [replace(r, run=run) for p in parts_list for r in p.run_records()]
        records.sort(key=lambda r: (r.step, r.branch))
        cache_bytes: dict[str, int] = {}
        for p in parts_list:
            for k, n in p.cache_bytes.items():
                cache_bytes[k] = cache_bytes.get(k, 0) + n
        return cls(
            records=records,
            cache_bytes=cache_bytes,
            collectives=sum(p.collectives for p in parts_list),
            collective_bytes=sum(p.collective_bytes for p in parts_list),
            bookkeeping_seconds=sum(p.bookkeeping_seconds for p in parts_list),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheStatistics:
        """Statistics read back from :meth:`to_dict`: the records, and the cache bytes,
        collectives and bookkeeping time of its summary; :meth:`table` prints what it printed.

        A dict that is not such statistics raises ``ValueError`` naming the key.

        Example:
            >>> s = CacheStatistics()
            >>> s.add(StepRecord(run=0, step=0, branch=0, kind="full", indicator=None, error=0.0,
            ...     blocks_computed=4, blocks_total=4, tokens_computed=64, tokens_total=64,
            ...     flops=100, flops_full=100))
            >>> CacheStatistics.from_dict(s.to_dict()).table() == s.table()
            True
        """
        if not isinstance(d, dict) or not isinstance(d.get("records"), list):
            raise ValueError("statistics: a JSON object with a 'records' list (CacheStatistics.to_json)")
        summary = d.get("summary") or {}
        if not isinstance(summary, dict):
            raise ValueError(f"statistics: 'summary' must be an object; got {summary!r}")
        try:
            records = [StepRecord(**r) for r in d["records"]]
        except TypeError as e:
            raise ValueError(f"statistics: 'records' holds an entry that is not a StepRecord ({e})") from None
        return cls(
            records=records,
            cache_bytes=dict(summary.get("cache_bytes", {})),
            collectives=int(summary.get("collectives", 0)),
            collective_bytes=int(summary.get("collective_bytes", 0)),
            bookkeeping_seconds=float(summary.get("bookkeeping_seconds", 0.0)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> CacheStatistics:
        """Statistics read from a file written by :meth:`to_json`.

        Example:
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "stats.json")
            >>> _ = CacheStatistics().to_json(path)
            >>> CacheStatistics.from_json(path).records
            []
        """
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"statistics file {path}: not JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"statistics file {path}: {e}") from None
