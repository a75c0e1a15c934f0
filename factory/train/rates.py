"""Rates as `factory eval` reports them: the share, its count and its 95% Wilson interval, side by side."""

from __future__ import annotations


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> list[float] | None:
    """The 95% Wilson score interval of a rate (successes may count ties as halves): on 4 prompts a win rate of 1
    reads [0.51, 1.0], not a result. None without data."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def rate(key: str, successes: float, n: int) -> dict:
    """{key: share, key_n: n, key_ci95: Wilson interval}; the share is None without data."""
    return {key: successes / n if n else None, f"{key}_n": n, f"{key}_ci95": wilson_interval(successes, n)}


def wins(probs: list[float]) -> float:
    """Wins out of per-prompt P(policy better): above 0.5 a win, exactly 0.5 a tie (half a win)."""
    return sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs)
