"""Progress bars written to a file (a rule's log) are whole lines at the configured interval."""

import io
import time

from eps.progress import progress


def test_a_bar_written_to_a_file_is_whole_lines_at_the_interval(monkeypatch):
    monkeypatch.setenv("EPS_PROGRESS_SECONDS", "0.2")
    stream = io.StringIO()
    bar = progress(range(12), desc="train", file=stream)
    for i in bar:
        time.sleep(0.05)
        bar.set_postfix(loss=f"{i:.1f}")  # no line of its own
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 7, lines  # the first, a few timed updates, the last
    assert lines[-1].startswith("train: 100%|") and "12/12" in lines[-1]
