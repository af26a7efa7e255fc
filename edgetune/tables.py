"""Aligned text tables for the terminal: the one formatter every verb's output uses."""


def columns(rows: list[tuple], gap: str = "  ") -> str:
    """`rows` (the first one the header) as left-aligned columns, trailing spaces stripped."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    return "\n".join(gap.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)
