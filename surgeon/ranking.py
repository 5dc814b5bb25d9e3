"""A search's ranking: its records (`SearchResult`, one `CandidateScore` per placement), as
Markdown, as a PNG of score against MACs with the Pareto front
(drawn with Pillow, so no plotting library is needed), and as an HTML page embedding both."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.placements import Placement

__all__ = [
    "CandidateScore",
    "SearchResult",
    "pareto_front",
    "ranking_html",
    "ranking_markdown",
    "ranking_png",
    "ranking_rows",
]


@dataclass(frozen=True)
class CandidateScore:
    """One candidate placement as scored on the held-out images with its supernet."""

    rank: int
    placement: Placement
    supernet: int  # the supernet that scored it (its most probable one)
    probability: float  # its assignment probability to that supernet
    score: float  # accuracy with labels, else top-1 agreement with the original
    agreement: float
    accuracy: float | None
    kd: float  # mean KL divergence from the original (temperature 1): ties broken by it
    macs: int
    default: bool  # the model's own placement
    pareto: bool  # no other candidate scores as well with fewer MACs

    def record(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "placement": list(self.placement.layers),
            "supernet": self.supernet,
            "probability": round(self.probability, 4),
            "score": round(self.score, 6),
            "agreement": round(self.agreement, 6),
            "accuracy": round(self.accuracy, 6) if self.accuracy is not None else None,
            "kd": round(self.kd, 6),
            "macs": self.macs,
            "default": self.default,
            "pareto": self.pareto,
        }


@dataclass(frozen=True)
class SearchResult:
    """What a search did and found; `candidates` best first."""

    candidates: tuple[CandidateScore, ...]
    metric: str  # "accuracy" or "agreement"
    space_size: int  # legal placements with this many steps
    sampled: bool  # the candidates are a sample of the space
    supernets: int
    shares: tuple[float, ...]  # fraction of candidates scored by each supernet
    balance: float  # the balance penalty at the end (0: equal shares)
    steps: int
    batch_size: int
    world_size: int
    images: int
    data_sha256: str
    train_images: int
    holdout_images: int
    seconds: float
    images_per_s: float
    options: dict[str, Any]
    losses: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    log_file: Path | None = None
    is_main: bool = True  # False on the other processes of a torchrun run (they write nothing)

    @property
    def default(self) -> CandidateScore | None:
        return next((c for c in self.candidates if c.default), None)

    def record(self) -> dict[str, Any]:
        """The JSON-ready ranking: the run, the assignment's balance and every candidate."""
        return {
            "kind": "search",
            "metric": self.metric,
            "space_size": self.space_size,
            "sampled": self.sampled,
            "supernets": self.supernets,
            "shares": [round(s, 4) for s in self.shares],
            "balance": round(self.balance, 6),
            "steps": self.steps,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "data": {
                "images": self.images,
                "sha256": self.data_sha256,
                "train": self.train_images,
                "holdout": self.holdout_images,
            },
            "options": self.options,
            "losses": {k: round(v, 6) for k, v in self.losses.items()},
            "seconds": round(self.seconds, 1),
            "images_per_s": round(self.images_per_s, 1),
            "resumed_from": self.resumed_from,
            "candidates": [c.record() for c in self.candidates],
        }


_WIDTH, _HEIGHT = 720, 440
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 40, 50


def _placement(c: CandidateScore, limit: int = 0) -> str:
    text = " ".join(c.placement.layers)
    return text if not limit or len(text) <= limit else text[: limit - 1] + "…"


def pareto_front(points: Sequence[tuple[float, int]]) -> list[bool]:
    """Which (score, MACs) points no other point beats: none scores at least as well with at
    most as many MACs and is better in one of the two."""
    return [
        not any(
            s2 >= s and m2 <= m and (s2 > s or m2 < m)
            for j, (s2, m2) in enumerate(points)
            if j != i
        )
        for i, (s, m) in enumerate(points)
    ]


def ranking_rows(result: SearchResult) -> list[list[str]]:
    """The table's rows: rank, placement, score, MACs, supernet, notes (default, Pareto)."""
    rows = []
    for c in result.candidates:
        notes = [n for n, on in (("default", c.default), ("Pareto", c.pareto)) if on]
        rows.append(
            [
                str(c.rank),
                _placement(c),
                f"{100 * c.score:.1f}%",
                f"{c.macs:,}",
                f"{c.supernet} ({100 * c.probability:.0f}%)",
                ", ".join(notes),
            ]
        )
    return rows


def _summary(result: SearchResult) -> str:
    sample = (
        f"a seeded sample of {len(result.candidates)} of the {result.space_size} legal placements"
        if result.sampled
        else f"all {result.space_size} legal placements"
    )
    shares = ", ".join(f"{100 * s:.0f}%" for s in result.shares)
    how = "accuracy" if result.metric == "accuracy" else "top-1 agreement with the original"
    return (
        f"{result.supernets} supernet(s) trained for {result.steps} steps of "
        f"{result.batch_size} images × {result.world_size} process(es) on "
        f"{result.train_images} images; {sample} scored on {result.holdout_images} held-out "
        f"images by {how}. "
        f"Candidates per supernet: {shares} (balance penalty {result.balance:.3f}, 0 = equal)."
        + _verdict(result)
    )


def _verdict(result: SearchResult) -> str:
    """Where the model's own placement ranks, against the best one."""
    own, best = result.default, result.candidates[0] if result.candidates else None
    if own is None or best is None:
        return ""
    if own.rank == 1:
        return " The model's own placement ranks first."
    return (
        f" The model's own placement ranks {own.rank} of {len(result.candidates)} "
        f"({100 * own.score:.1f}% against {100 * best.score:.1f}%)."
    )


def ranking_markdown(result: SearchResult) -> str:
    """The ranking as a Markdown page: what ran, then the table."""
    lines = ["# Downsampling placement search", "", _summary(result), ""]
    lines += ["| rank | placement | score | MACs | supernet | |", "|---:|---|---:|---:|---|---|"]
    for row in ranking_rows(result):
        row[1] = f"`{row[1]}`"
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _ticks(low: float, high: float) -> list[float]:
    span = high - low
    return [low + span * i / 4 for i in range(5)]


def ranking_png(result: SearchResult) -> bytes:
    """Score (y) against MACs (x) of every candidate: the Pareto front joined by a line and
    drawn in blue, the model's own placement ringed in red, the top-ranked one filled."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    cands: Sequence[CandidateScore] = result.candidates
    macs = [float(c.macs) for c in cands] or [0.0]
    scores = [c.score for c in cands] or [0.0]
    x0, x1 = min(macs), max(macs)
    y0, y1 = min(scores), max(scores)
    if x1 == x0:
        x0, x1 = x0 * 0.9, x1 * 1.1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.05, y1 + 0.05
    pad_x, pad_y = (x1 - x0) * 0.05, (y1 - y0) * 0.08
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    width, height = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def at(m: float, s: float) -> tuple[float, float]:
        return (
            _LEFT + (m - x0) / (x1 - x0) * width,
            _TOP + (1 - (s - y0) / (y1 - y0)) * height,
        )

    draw.rectangle((_LEFT, _TOP, _LEFT + width, _TOP + height), outline="black")
    for value in _ticks(x0, x1):
        x, _ = at(value, y0)
        draw.line((x, _TOP + height, x, _TOP + height + 4), fill="black")
        draw.text((x - 18, _TOP + height + 8), f"{value / 1e6:.2f}M", fill="black")
    for value in _ticks(y0, y1):
        _, y = at(x0, value)
        draw.line((_LEFT - 4, y, _LEFT, y), fill="black")
        draw.text((_LEFT - 50, y - 6), f"{100 * value:.1f}%", fill="black")
    draw.text((_LEFT + width // 2 - 20, _HEIGHT - 22), "MACs", fill="black")
    draw.text((8, _TOP - 28), f"score ({result.metric})", fill="black")
    draw.text(
        (_LEFT + 150, _TOP - 28),
        "blue: Pareto front   red ring: default placement   filled: rank 1",
        fill="black",
    )
    front = sorted((c for c in cands if c.pareto), key=lambda c: c.macs)
    if len(front) > 1:
        draw.line([at(c.macs, c.score) for c in front], fill=(40, 90, 200), width=2)
    for c in cands:
        x, y = at(c.macs, c.score)
        colour = (40, 90, 200) if c.pareto else (130, 130, 130)
        fill = colour if c.rank == 1 else None
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=colour, fill=fill, width=2)
        if c.default:
            draw.ellipse((x - 8, y - 8, x + 8, y + 8), outline=(210, 40, 40), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def ranking_html(result: SearchResult, png: bytes) -> str:
    """A self-contained HTML page: the summary, the plot (embedded) and the ranking table."""
    e = html.escape
    head = ["rank", "placement", "score", "MACs", "supernet", ""]
    cells = "".join(f"<th>{e(h)}</th>" for h in head)
    body = []
    for row in ranking_rows(result):
        row[1] = f"<code>{e(row[1])}</code>"
        tds = "".join(
            f"<td>{cell}</td>" if i == 1 else f"<td>{e(cell)}</td>" for i, cell in enumerate(row)
        )
        body.append(f"<tr>{tds}</tr>")
    image = base64.b64encode(png).decode("ascii")
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        "<title>surgeon search</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
        "td:nth-child(3),td:nth-child(4){text-align:right}"
        "</style></head><body>\n<h1>Downsampling placement search</h1>\n"
        f"<p>{e(_summary(result))}</p>\n"
        "<img alt='score against MACs, Pareto front in blue' "
        f"src='data:image/png;base64,{image}'>\n"
        f"<table><thead><tr>{cells}</tr></thead><tbody>\n"
        + "\n".join(body)
        + "\n</tbody></table>\n</body></html>\n"
    )
