"""The README's example trains, and its inspection snippet runs."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_example_trains_and_shows_its_graph(capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    losses = namespace["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    exec(compile(blocks[1], str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "conv(" in out and "fused(" in out and "def loss_fn_grad(" in out


def test_readme_gives_exactly_the_two_setup_commands():
    text = README.read_text()
    assert "python3 -m pip install nox && python3 -m nox -s bench" in text
    assert "python3 -m pip install nox && python3 -m nox -s tests" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pip install nox && python3 -m nox -s tests" in ci
