"""Transfer progress: plain periodic lines off a terminal, rich bars on one."""

from __future__ import annotations

import io

from migrate.executor.progress import PlainBoard, RichBoard, human_bytes, human_seconds, open_board

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_board_prints_a_line_per_interval_and_one_at_the_end() -> None:
    """Off a TTY: nothing before the interval, then bytes, percent, rate and time left; a done line."""
    clock, out = Clock(), io.StringIO()
    board = PlainBoard(out, interval_s=10, clock=clock)
    task = board.task("web/scsi0", total=1000 * MiB)
    clock.now += 5
    task.advance(100 * MiB)
    assert out.getvalue() == ""
    clock.now += 5
    task.advance(100 * MiB)
    clock.now += 1
    task.advance(100 * MiB)  # inside the next interval: no line
    clock.now += 9
    task.advance(100 * MiB)
    clock.now += 5
    task.advance(600 * MiB)
    task.finish()
    task.finish()  # finishing twice prints once
    assert out.getvalue().splitlines() == [
        "web/scsi0: 200.0 MiB of 1000.0 MiB (20%), 20.0 MiB/s, about 40s left",
        "web/scsi0: 400.0 MiB of 1000.0 MiB (40%), 20.0 MiB/s, about 30s left",
        "web/scsi0: done, 1000.0 MiB in 25s (40.0 MiB/s)",
    ]


def test_plain_board_rate_counts_only_this_sessions_bytes() -> None:
    """A resumed transfer starts at its offset; the rate is over the bytes sent now, not the offset."""
    clock, out = Clock(), io.StringIO()
    task = PlainBoard(out, interval_s=1, clock=clock).task("db/scsi0", total=4 * MiB, done=2 * MiB)
    clock.now += 2
    task.advance(1 * MiB)
    assert out.getvalue() == "db/scsi0: 3.0 MiB of 4.0 MiB (75%), 512.0 KiB/s, about 2s left\n"


def test_open_board_picks_plain_off_a_terminal_and_bars_on_one() -> None:
    """open_board gives plain lines for a non-TTY stream and rich bars when told it is a terminal."""
    assert isinstance(open_board(io.StringIO()), PlainBoard)
    out = io.StringIO()
    with open_board(out, tty=True) as board:
        assert isinstance(board, RichBoard)
        task = board.task("web/scsi1", total=2 * MiB)
        task.advance(MiB)
        task.finish()
    shown = out.getvalue()
    assert "web/scsi1" in shown and "2.0/2.0 MiB" in shown


def test_human_units() -> None:
    """Sizes in binary units and durations in h/m/s, as the lines print them."""
    assert [human_bytes(512), human_bytes(1536), human_bytes(5 * (1 << 40))] == [
        "512 B",
        "1.5 KiB",
        "5.0 TiB",
    ]
    assert [human_seconds(7), human_seconds(125), human_seconds(3 * 3600 + 61)] == ["7s", "2m05s", "3h01m"]
