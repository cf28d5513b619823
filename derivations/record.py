"""The record a theorem returns, and the decorator that times it and turns an exception into a failure."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List


@dataclass
class TheoremRecord:
    """The outcome of one theorem: ``holds`` is computed, never assumed.

    ``expressions`` holds the sympy expressions involved (derived forms, differences that must vanish);
    ``checks`` names each sub-claim and whether it held; ``details`` says what failed.
    """

    name: str
    statement: str
    holds: bool
    seconds: float
    expressions: Dict[str, Any] = field(default_factory=dict)
    checks: Dict[str, bool] = field(default_factory=dict)
    details: str = ""

    def to_json(self) -> dict:
        """``name, statement, holds, seconds, checks, details`` and the expressions as strings."""
        return {"name": self.name, "statement": self.statement, "holds": bool(self.holds),
                "seconds": round(self.seconds, 4), "checks": {k: bool(v) for k, v in self.checks.items()},
                "details": self.details, "expressions": {k: str(v) for k, v in self.expressions.items()}}


class Claims:
    """Collects the sub-claims of a theorem: ``claims.check(name, ok)``; the theorem holds if all do."""

    def __init__(self) -> None:
        self.checks: Dict[str, bool] = {}
        self.expressions: Dict[str, Any] = {}
        self.failures: List[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks[name] = bool(ok)
        if not ok:
            self.failures.append(f"{name}{': ' + detail if detail else ''}")
        return bool(ok)

    def expr(self, name: str, value: Any) -> None:
        self.expressions[name] = value


TheoremFn = Callable[..., TheoremRecord]


def theorem(name: str, statement: str) -> Callable[[Callable[..., None]], TheoremFn]:
    """Wrap ``body(claims, closed_form=None)`` into a theorem returning a :class:`TheoremRecord`."""

    def wrap(body: Callable[..., None]) -> TheoremFn:
        @functools.wraps(body)
        def run(closed_form: Any = None) -> TheoremRecord:
            claims = Claims()
            start = time.perf_counter()
            error = ""
            try:
                body(claims, closed_form=closed_form)
            except Exception as exc:  # a theorem that crashes does not hold; say why
                error = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - start
            holds = not error and bool(claims.checks) and all(claims.checks.values())
            details = "; ".join(claims.failures + ([error] if error else []))
            return TheoremRecord(name, statement, holds, seconds, claims.expressions, claims.checks, details)

        run.__name__ = name
        run.statement = statement  # type: ignore[attr-defined]
        return run

    return wrap
