"""The scripts in ``examples/`` run as the README and their docstrings say (``python examples/X.py``), in a
fresh process, and what they print about the lowered model holds: each is a user's first contact with the
library, so a change that breaks one fails here, not in someone's first hour."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# script -> (the optional modules it imports, the printed difference between the lowered and the trained model)
CASES = {
    "resnet_prune_lower.py": ((), r"matches the pruned model: max \|diff\| = (\S+),"),
    "hf_trainer_digits.py": (("transformers", "accelerate", "sklearn"), r"max output difference (\S+)"),
    "lightning_digits.py": (("lightning", "sklearn"), r"max output difference (\S+)"),
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_the_example_runs_and_its_lowered_model_matches(script, tmp_path):
    needs, difference = CASES[script]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.findall(difference, done.stdout)
    assert found, done.stdout[-2000:]
    assert all(float(value) < 1e-4 for value in found), found
