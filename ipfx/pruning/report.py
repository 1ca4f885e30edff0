"""What a pruning decision did, per tensor, printable as a table."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """Kept/total per prunable tensor after a pruning step."""

    method: str
    space: str  # "ip", "sp" or "mixed"
    rows: tuple[Row, ...]

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {r.name: (r.kept, r.total) for r in self.rows}

    def __str__(self) -> str:
        width = max([len("tensor")] + [len(r.name) for r in self.rows])
        lines = [f"{self.method} pruning ({self.space}): sparsity {self.sparsity:.4f}, "
                 f"{self.kept:,} of {self.total:,} coefficients kept",
                 f"{'tensor':<{width}}  {'kept':>10}  {'total':>10}  {'density':>8}"]
        lines += [f"{r.name:<{width}}  {r.kept:>10,}  {r.total:>10,}  {r.density:>8.4f}" for r in self.rows]
        return "\n".join(lines)
