"""Progress of long steps: a tqdm bar on a terminal, one plain line per step in a log."""
import io

from sct_convert._utils.progress import Steps


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_one_line_per_step_when_not_on_a_terminal():
    log = io.StringIO()
    with Steps(2, "calibrate", stream=log) as steps:
        steps.advance("scale 224")
        steps.advance("scale 128")
    lines = log.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["calibrate: 1/2 scale 224", "calibrate: 2/2 scale 128"]
    assert "\r" not in log.getvalue()


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    screen = Terminal()
    with Steps(3, "export onnx", stream=screen) as steps:
        for scale in (224, 192, 128):
            steps.advance(f"traced scale {scale}")
    assert "\r" in screen.getvalue() and "3/3" in screen.getvalue() and "export onnx" in screen.getvalue()
    quiet = Terminal()
    with Steps(3, "export onnx", enabled=False, stream=quiet) as steps:
        steps.advance("x")
    assert quiet.getvalue() == "" and steps.done == 1
