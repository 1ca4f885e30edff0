"""A new user's first hour, scripted: what the README shows, on models users bring, through to a file that
loads in a fresh process. Slow (about 3 minutes on 2 cores): ``pytest -m slow tests/test_journey.py``.

Each step is what a user would write from the README and the docs alone; a step that needs anything
else (a private ipfx name, a workaround) is a failure of the library, not of the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ipfx

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _fresh_python(code: str, cwd: Path) -> str:
    """Run ``code`` in a new interpreter (nothing imported, nothing cached in memory); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"fresh process failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_readme_snippet_runs_as_written(tmp_path):
    """The first Python block of the README, unchanged, in a fresh process."""
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "ipfx.transform" in snippet and "ipfx.lower" in snippet
    out = _fresh_python(snippet + "\nprint('JOURNEY-OK', type(deploy).__name__, type(small).__name__)\n", tmp_path)
    assert "JOURNEY-OK" in out


def test_a_timm_model_pruned_trained_lowered_saved_and_loaded_elsewhere(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    ip = ipfx.transform(model, example_inputs=(x,))
    report = ipfx.prune(ip, "magnitude", 0.9)
    assert ipfx.sparsity(ip) == pytest.approx(0.9, abs=1e-3) and str(report)
    optimizer = torch.optim.SGD(ip.parameters(), lr=0.05, momentum=0.9)  # built after transform, as documented
    ip.train()
    before = {n: p.detach().clone() for n, p in ip.named_parameters() if n.endswith(".coeff")}
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(ip(x), y).backward()
        optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in ip.named_parameters() if n in before)  # it trained
    assert ipfx.sparsity(ip) == pytest.approx(0.9, abs=1e-3)  # and masked coefficients stayed pruned
    ip.eval()
    fused = ipfx.lower(ip, "fused").eval()
    dense = ipfx.lower(ip, "dense").eval()
    other = torch.randn(3, 3, 80, 80)  # another batch and image size than the example
    with torch.no_grad():
        expected = ip(other)
        torch.testing.assert_close(fused(other), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dense(other), expected, rtol=1e-4, atol=1e-4)
    batch = torch.export.Dim("batch")
    program = torch.export.export(fused, (x,), dynamic_shapes=({0: batch},))  # the standard form
    torch.testing.assert_close(program.module()(other[:, :, :64, :64]), ip(other[:, :, :64, :64]).detach(),
                               rtol=1e-4, atol=1e-4)
    path = ipfx.deploy.save_program(fused, tmp_path / "resnet10t", x)
    torch.save({"x": other[:, :, :64, :64], "y": ip(other[:, :, :64, :64]).detach()}, tmp_path / "check.pt")
    out = _fresh_python(f"""
        import torch, ipfx
        program = ipfx.deploy.load({str(path)!r})
        check = torch.load({str(tmp_path / "check.pt")!r}, weights_only=True)
        torch.testing.assert_close(program.module()(check["x"]), check["y"], rtol=1e-4, atol=1e-4)
        print("LOADED-OK")
    """, tmp_path)
    assert "LOADED-OK" in out
    reloaded = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    reloaded.load_state_dict(dense.state_dict())  # the dense weights load into the library's own class
    with torch.no_grad():
        torch.testing.assert_close(reloaded(other), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_labels", [True, False])
def test_a_hugging_face_classifier_with_and_without_labels(with_labels, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=4)
    model = transformers.ViTForImageClassification(config).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    example = {"pixel_values": x, **({"labels": y} if with_labels else {})}
    ip = ipfx.transform(model, example_kwargs=example)
    ipfx.prune(ip, "magnitude", 0.5)
    ip.eval()
    x3, y3 = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    results = {"transformed": ip, "dense": ipfx.lower(ip, "dense").eval(), "fused": ipfx.lower(ip, "fused").eval()}
    with torch.no_grad():
        want = ip(pixel_values=x3, labels=y3)
        for name, result in results.items():
            for call in ({"pixel_values": x3}, {"pixel_values": x3, "labels": None}, {"pixel_values": x3, "labels": y3}):
                got = result(**call)
                torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4, msg=name)
                assert (got.loss is None) == (call.get("labels") is None), name
                if got.loss is not None:
                    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4, msg=name)
            batch = torch.export.Dim("batch")
            program = torch.export.export(result, (x,), dynamic_shapes=({0: batch},))
            torch.testing.assert_close(program.module()(x3).logits, want.logits, rtol=1e-4, atol=1e-4, msg=name)
