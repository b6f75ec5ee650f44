"""``foredeck trace RUN``: a run's step tree from its journal, with timings, tokens and cost.

Sub-agent runs hang under the step that started them. ``--png FILE`` also draws the tree as a
waterfall chart (one bar per step on the run's time axis), with matplotlib from the ``png``
extra (``pip install 'foredeck-client[png]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from foredeck.common.v1 import journal_pb2, run_event_pb2, run_pb2, usage_pb2
from foredeck_client.sync import Client

__all__ = ["RunNode", "StepRow", "load_tree", "render_png", "render_text", "usage_text"]

_JOURNAL_PAGE = 100  # the most a FULL page holds


def _time(stamp: Timestamp) -> datetime | None:
    return stamp.ToDatetime() if stamp.seconds or stamp.nanos else None


@dataclass
class StepRow:
    """One journal entry, placed on the run tree's time axis."""

    entry: journal_pb2.JournalEntry
    children: list[RunNode] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return run_event_pb2.StepKind.Name(self.entry.kind).removeprefix("STEP_KIND_").lower()

    @property
    def outcome(self) -> str:
        name = journal_pb2.JournalEntryOutcome.Name(self.entry.outcome)
        return name.removeprefix("JOURNAL_ENTRY_OUTCOME_").lower()

    @property
    def start(self) -> datetime | None:
        return _time(self.entry.start_time)

    @property
    def end(self) -> datetime | None:
        return _time(self.entry.end_time)

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return (self.end - self.start).total_seconds()

    @property
    def label(self) -> str:
        record = self.entry.WhichOneof("record")
        if record == "tool_exchange":
            return f"{self.entry.tool_exchange.tool_call.tool_name}: {self.entry.description}"
        return self.entry.description


@dataclass
class RunNode:
    """A run with its steps; sub-agent runs sit under the steps that started them."""

    run: run_pb2.Run
    steps: list[StepRow]

    def walk(self, depth: int = 0) -> list[tuple[int, RunNode | StepRow]]:
        """Depth-first: the run, then each step followed by its child runs."""
        rows: list[tuple[int, RunNode | StepRow]] = [(depth, self)]
        for step in self.steps:
            rows.append((depth + 1, step))
            for child in step.children:
                rows.extend(child.walk(depth + 2))
        return rows

    def totals(self) -> tuple[int, usage_pb2.Usage]:
        """Steps and usage of the whole tree."""
        usage = usage_pb2.Usage()
        count = 0
        for _, row in self.walk():
            if isinstance(row, StepRow):
                count += 1
                usage.input_tokens += row.entry.usage.input_tokens
                usage.output_tokens += row.entry.usage.output_tokens
                usage.cost_usd_micros += row.entry.usage.cost_usd_micros
        return count, usage


def _journal(client: Client, run_id: str) -> list[journal_pb2.JournalEntry]:
    entries: list[journal_pb2.JournalEntry] = []
    token = ""
    while True:
        page = client.get_run_journal(
            run_id, view=journal_pb2.JOURNAL_VIEW_FULL, page_size=_JOURNAL_PAGE, page_token=token
        )
        entries.extend(page)
        token = page.next_page_token
        if not token:
            return entries


def load_tree(client: Client, run_id: str) -> RunNode:
    """The run, its sub-agent runs and every run's journal."""
    tree = client.get_run_tree(run_id)
    runs = list(tree.runs) or [client.get_run(run_id)]
    nodes = {
        run.run_id: RunNode(run, [StepRow(e) for e in _journal(client, run.run_id)]) for run in runs
    }
    for node in nodes.values():
        for step in node.steps:
            child = nodes.get(step.entry.child_run_id) if step.entry.child_run_id else None
            if child is not None:
                step.children.append(child)
    return nodes[runs[0].run_id]


def usage_text(usage: usage_pb2.Usage) -> str:
    """Tokens and cost for people: ``150 tokens (120 in, 30 out), $0.0012``."""
    tokens = usage.input_tokens + usage.output_tokens
    dollars = usage.cost_usd_micros / 1e6
    return f"{tokens} tokens ({usage.input_tokens} in, {usage.output_tokens} out), ${dollars:.4f}"


def render_text(root: RunNode) -> str:
    """The tree as indented lines: runs with status and totals, steps with timing and usage."""
    lines: list[str] = []
    for depth, row in root.walk():
        pad = "  " * depth
        if isinstance(row, RunNode):
            run = row.run
            status = run_pb2.RunStatus.Name(run.status).removeprefix("RUN_STATUS_").lower()
            seconds = ""
            start, end = _time(run.start_time), _time(run.end_time)
            if start is not None and end is not None:
                seconds = f" · {(end - start).total_seconds():.2f}s"
            agent = f"{run.agent_name} v{run.agent_version}"
            lines.append(
                f"{pad}run {run.run_id} · {agent} · {status}{seconds} · {usage_text(run.usage)}"
            )
            continue
        took = f"{row.seconds:7.2f}s" if row.seconds is not None else "      - "
        tokens = row.entry.usage.input_tokens + row.entry.usage.output_tokens
        spent = f"  {tokens} tok" if tokens else ""
        lines.append(
            f"{pad}{row.entry.step_index:>3} {row.kind:<11} {took} {row.outcome:<9} "
            f"{row.label[:70]}{spent}"
        )
    steps, usage = root.totals()
    lines.append(f"total: {steps} steps, {usage_text(usage)}")
    return "\n".join(lines) + "\n"


_COLOURS = {
    "recall": "#6baed6",
    "plan": "#9e9ac8",
    "replan": "#bcbddc",
    "reason": "#fdae6b",
    "tool_call": "#74c476",
    "sub_agent": "#fd8d3c",
    "synthesize": "#fb6a4a",
    "remember": "#969696",
}


def render_png(root: RunNode, path: Path) -> None:
    """Draw the tree as a waterfall chart: a bar per step, on the root run's time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(depth, row) for depth, row in root.walk() if isinstance(row, StepRow)]
    starts = [row.start for _, row in rows if row.start is not None]
    origin = min(starts) if starts else datetime.now()
    height = max(2.0, 0.35 * len(rows) + 1.2)
    figure, axes = plt.subplots(figsize=(11, height))
    labels: list[str] = []
    for y, (depth, row) in enumerate(rows):
        labels.append(f"{'  ' * (depth - 1)}{row.entry.step_index} {row.kind}: {row.label[:40]}")
        if row.start is None:
            continue
        left = (row.start - origin).total_seconds()
        width = max(row.seconds or 0.0, 0.002)
        colour = _COLOURS.get(row.kind, "#bdbdbd")
        edge = colour if row.outcome == "succeeded" else "#cb181d"  # failures outlined in red
        axes.barh(y, width, left=left, color=colour, edgecolor=edge)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("seconds since the run's first step")
    steps, usage = root.totals()
    axes.set_title(f"run {root.run.run_id} · {steps} steps · {usage_text(usage)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
