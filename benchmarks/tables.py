"""Markdown tables for the benchmark scripts: label, value, ratio to the baseline row."""

from __future__ import annotations


def print_table(title: str, rows: list[tuple[str, float, float | None]], unit: str) -> None:
    """Print rows of (label, value, ratio or None) as a Markdown table under ``title``."""
    width = max(len(label) for label, _, _ in rows)
    print(f"\n{title}")
    print(f"| {'measurement':<{width}} | {unit:>10} | {'ratio':>7} |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 9}|")
    for label, value, ratio in rows:
        ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"| {label:<{width}} | {value:>10.1f} | {ratio_text:>7} |")
