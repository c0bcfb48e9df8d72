"""Tests of runtime/progress.py: a line per update off a terminal, one rewritten line on one."""

import io

from diffusion_jax.runtime import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_update_is_a_line_of_its_own():
    stream = io.StringIO()
    bar = progress.ProgressBar("training", 300, unit="img", items_per_step=64, stream=stream)
    for step in (100, 200, 300):
        bar.update(step, loss=0.25, skipped=None)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "training 100/300",
        "training 200/300",
        "training 300/300",
    ]
    assert all("loss 0.25" in line and "img/s" in line and "ETA" in line for line in lines)
    assert "skipped" not in stream.getvalue()  # None: not shown
    assert "\r" not in stream.getvalue()


def test_on_a_terminal_the_line_rewrites_itself_and_ends_once():
    stream = _Terminal()
    bar = progress.ProgressBar("sampling", 10, unit="img", stream=stream)
    for done in (4, 8):
        bar.update(done)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.count("\n") == 1 and text.endswith("\n")
    assert "sampling 8/10 [################----]" in text


def test_progress_line_and_duration_format():
    line = progress.progress_line(
        "training", 120, 1000, rate=410.2, unit="img", eta_s=192, loss=0.0312, skipped=3
    )
    assert line == (
        "training 120/1000 [##------------------] loss 0.0312 | skipped 3 | 410 img/s | ETA 0:03:12"
    )
    assert progress.format_duration(3725.4) == "1:02:05"


def test_off_a_terminal_a_long_phase_shows_a_few_evenly_spaced_lines():
    stream = io.StringIO()
    bar = progress.ProgressBar("sampling", 1000, unit="img", stream=stream, lines_off_terminal=4)
    for done in range(10, 1001, 10):
        bar.update(done)
    shown = [int(line.split()[1].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert shown == [10, 260, 510, 760, 1000]
