"""What kiln's source may do with files from elsewhere: every torch.load runs with
weights_only=True (kiln.checkpoint.safe_load), and only the user's own `pipe:` data sources reach
a shell."""

from pathlib import Path

import kiln

SOURCE = Path(kiln.__file__).parent


def sources() -> dict[str, str]:
    return {str(p.relative_to(SOURCE)): p.read_text() for p in SOURCE.rglob("*.py")}


def test_every_torch_load_is_weights_only():
    found = {name: text for name, text in sources().items() if "torch.load(" in text}
    assert found, "expected kiln to load checkpoints somewhere"
    for name, text in found.items():
        assert "weights_only=False" not in text, name
        if name != "checkpoint/safe_load.py":
            # each call sits inside `with weights_only_loads():` (DeepSpeed's own loads too)
            assert "with weights_only_loads():" in text, name
            for line_no, line in enumerate(text.splitlines(), 1):
                if "torch.load(" in line:
                    before = text.splitlines()[:line_no]
                    opened = [i for i, l in enumerate(before) if "with weights_only_loads():" in l]
                    assert opened, f"{name}:{line_no} torch.load outside weights_only_loads()"
                    indent = len(before[opened[-1]]) - len(before[opened[-1]].lstrip())
                    assert len(line) - len(line.lstrip()) > indent, f"{name}:{line_no} not inside the with-block"


def test_only_the_users_pipe_sources_reach_a_shell():
    shells = sorted(name for name, text in sources().items() if "shell=True" in text)
    assert shells == ["data/sources.py"], shells
    text = sources()["data/sources.py"]
    assert text.count("shell=True") == 1
