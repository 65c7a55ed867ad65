"""README's library example runs as pasted (sizes shrunk so it is quick)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("hidden_size=128", "hidden_size=16").replace("max_epoch=2", "max_epoch=1")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "accuracy" in out
    assert (tmp_path / "addition.npz").exists()


def test_readme_gives_two_commands():
    text = README.read_text()
    assert "python -m fastseq.train" in text and "pytest" in text
