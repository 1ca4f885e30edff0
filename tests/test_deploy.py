"""``ipfx.deploy``'s files as a user names and opens them: a stem or a whole file name, a folder not made
yet, a save that fails or is killed midway (the previous file stays whole), and a loaded program's
``.eval()`` / ``.train()``, which torch's loaded modules refuse outright."""

import contextlib
import copy
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import ipfx
import ipfx.deploy
from helpers import OptionalScale, assert_close
from ipfx.capture.shape_guards import is_guard_failure
from ipfx.errors import IPFXValueError


def _net() -> nn.Module:
    """Batch norm (whose mode changes what it computes), dropout, and both pools the frozen lowering makes
    native (new modules, which must take the model's mode)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(8, 4))


def test_a_stem_or_a_whole_file_name_and_a_new_folder(tmp_path):
    model = _net().eval()
    x = torch.randn(2, 3, 8, 8)
    for stem, name in ((tmp_path / "a" / "m", "m.pt2"), (tmp_path / "b" / "c" / "m.pt2", "m.pt2")):
        path = ipfx.deploy.save_program(model, stem, x)
        assert path.name == name and path.is_file(), path  # not m.pt2.pt2; the folders were made
    for stem in (tmp_path / "d" / "m", tmp_path / "d" / "m.state_dict.pt"):
        path = ipfx.deploy.save_state_dict(model, stem)
        assert path.name == "m.state_dict.pt" and path.is_file(), path
    for name in ("model.pt", "model.pth", "MODEL.PT"):  # a whole file name of its own (was model.pt.state_dict.pt)
        path = ipfx.deploy.save_state_dict(model, tmp_path / "e" / name)
        assert path.name == name and path.is_file(), path


def test_an_example_of_one_sample_or_of_other_sizes_is_said_at_save(tmp_path):
    """A one-sample example fixes the program's batch at 1 (torch.export fixes a size it sees as 1): a warning
    says so at save, not an error at the first batch of 2; an example the model's own size checks refuse is
    an error about the example (the graph's guard said to transform the model again)."""
    x = torch.randn(2, 3, 8, 8)
    model = ipfx.lower(ipfx.transform(_net().eval(), example_inputs=(x,)), "dense")
    with pytest.warns(UserWarning, match="example's batch is 1.*2 samples or more"):
        ipfx.deploy.save_program(model, tmp_path / "one", x[:1])
    with pytest.warns(UserWarning, match="example's batch is 1"):  # inside a structure too
        ipfx.deploy.save_program(_Pair().eval(), tmp_path / "pair", ((x[:1], x[:1]),))
    with pytest.raises(IPFXValueError, match=r"the example does not fit .*\(3 == \w+\.shape\[1\] does not hold"):
        ipfx.deploy.save_program(model, tmp_path / "gray", torch.randn(2, 1, 8, 8))


def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    model = _net().eval()
    x = torch.randn(2, 3, 8, 8)
    program = ipfx.deploy.save_program(model, tmp_path / "m", x)
    state = ipfx.deploy.save_state_dict(model, tmp_path / "m")
    before = {p: p.read_bytes() for p in (program, state)}

    def half_written(obj, f, *args, **kwargs):  # a full disk, say: part of the file, then an error
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
            out.write(b"PK\x03\x04 part of a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    monkeypatch.setattr(torch.export, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        ipfx.deploy.save_state_dict(model, tmp_path / "m")
    with pytest.raises(OSError, match="No space left"):
        ipfx.deploy.save_program(model, tmp_path / "m", x)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in (program, state)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "m.state_dict.pt"]  # no temporary left
    assert_close(ipfx.deploy.load_module(program)(x), model(x), kind="saved before a failed save")


_SAVE_FOREVER = """
import sys, time, torch, torch.nn as nn, ipfx.deploy
model = nn.Module()
model.register_buffer("w", torch.randn(2 ** 24))  # 64 MiB: each write takes a while
while True:
    started = time.monotonic()
    ipfx.deploy.save_state_dict(model, sys.argv[1])
    print(time.monotonic() - started, flush=True)
"""


def test_a_save_killed_midway_leaves_a_whole_file(tmp_path):
    """kill -9 a process in the middle of saving over its previous file: the file is still a whole save
    (torch reads it), and the killed writer's temporary is deleted by the next save."""
    path = tmp_path / "m.state_dict.pt"
    writer = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        took = [float(writer.stdout.readline()) for _ in range(2)]  # two whole saves: how long one takes
        time.sleep(min(took) / 2)  # into the third
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert torch.load(path, weights_only=True)["w"].shape == (2 ** 24,)
    assert len(list(tmp_path.glob(".m.state_dict.pt.*.tmp"))) <= 1  # the killed write's, if it was writing
    ipfx.deploy.save_state_dict(nn.Linear(1, 1), path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.state_dict.pt"]
    assert set(torch.load(path, weights_only=True)) == {"weight", "bias"}


def test_a_size_the_program_does_not_take_is_refused_saying_why_and_what_to_do(tmp_path):
    """torch.export assumes a size it saw above 1 is never 1: a net saved on 16x16 images refuses those whose last
    feature map is 1x1 (a ResNet saved on 64x64 and called on 32x32). The loaded program refuses them with an
    ipfx shape guard naming the file, the condition and the example, and saying what to do (torch's own message
    was "Guard failed: 1 + (-1 + input.size()[3]) // 4 != 1"); the same in a deep copy and with autograd on,
    and every size the example left free still computes."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(1), nn.Linear(4, 2)).eval()
    path = ipfx.deploy.save_program(model, tmp_path / "net", torch.randn(2, 3, 16, 16))
    loaded = ipfx.deploy.load_module(path)
    for module, grad in [(loaded, False), (loaded, True), (copy.deepcopy(loaded), False)]:
        with torch.set_grad_enabled(grad):
            for shape in [(1, 3, 4, 4), (2, 3, 3, 3)]:
                with pytest.raises(AssertionError) as refused:
                    module(torch.randn(*shape))
                message = str(refused.value)
                assert is_guard_failure(refused.value) and str(path) in message and "2x3x16x16" in message, message
                assert "!= 1" in message and "save_program(model, stem, example)" in message, message
            x = torch.randn(3, 3, 12, 20)
            assert_close(module(x), model(x), kind="a free size")


def test_a_loaded_program_takes_eval_and_train_for_the_mode_it_was_saved_in(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    model = _net().eval()
    frozen = ipfx.lower(ipfx.transform(model, example_inputs=(x,)), target="fused", freeze=True)
    loaded = ipfx.deploy.load_module(ipfx.deploy.save_program(frozen, tmp_path / "eval", x))
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert loaded.eval() is loaded and loaded.train(False) is loaded
    holder = nn.Sequential(loaded).eval()  # a model holding the program: nn.Module.eval reaches it
    with torch.no_grad():
        torch.testing.assert_close(holder(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(IPFXValueError, match=r"exported in eval mode.*save_program\(model\.train\(\)"):
        loaded.train()
    copied = copy.deepcopy(copy.deepcopy(loaded))  # (fx builds a copy anew: the rules must come along)
    assert not copied.training and copied.eval() is copied
    with pytest.raises(IPFXValueError, match="exported in eval mode"):
        copied.train()
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=1e-5, atol=1e-5)

    trained = nn.Sequential(*list(_net().children())[:3]).train()  # batch norm on the batch's own statistics
    loaded = ipfx.deploy.load_module(ipfx.deploy.save_program(trained, tmp_path / "train", x))
    assert loaded.training and loaded.train() is loaded
    torch.testing.assert_close(loaded(x), trained(x))
    with pytest.raises(IPFXValueError, match="exported in train mode"):
        loaded.eval()

    mixed = _net().eval()
    mixed[1].train()
    loaded = ipfx.deploy.load_module(ipfx.deploy.save_program(mixed, tmp_path / "mixed", x))
    for call in (loaded.eval, loaded.train):
        with pytest.raises(IPFXValueError, match="in train and in eval mode"):
            call()

    torch.export.save(torch.export.export(model, (x,)), tmp_path / "plain.pt2")  # not ipfx's: no mode recorded
    loaded = ipfx.deploy.load_module(tmp_path / "plain.pt2")
    with pytest.raises(IPFXValueError, match="does not record the mode"):
        loaded.eval()


def test_a_loaded_program_refuses_pickling_saying_what_to_do_and_saves_again(tmp_path):
    """torch's loaded modules hold generated functions that cannot be pickled: ``torch.save`` of a loaded
    program (or of a model holding one) says so and what to do, instead of torch's AttributeError on a local
    lambda; what it says works (its state dict saves; ``save_program`` writes it anew)."""
    x = torch.randn(4, 3, 8, 8)
    model = _net().eval()
    frozen = ipfx.lower(ipfx.transform(model, example_inputs=(x,)), target="fused", freeze=True)
    loaded = ipfx.deploy.load_module(ipfx.deploy.save_program(frozen, tmp_path / "net", x))
    for value in (loaded, nn.Sequential(loaded), copy.deepcopy(loaded)):
        with pytest.raises(IPFXValueError, match=r"net\.pt2 cannot be pickled.*save_program"):
            torch.save(value, io.BytesIO())
    torch.save(loaded.state_dict(), io.BytesIO())
    again = ipfx.deploy.load_module(ipfx.deploy.save_program(loaded, tmp_path / "again", x))
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))


def test_models_transformed_lowered_or_loaded_inside_inference_mode_run_there_and_see_in_place_edits(tmp_path):
    """ipfx.transform, lower and deploy.load_module called inside ``torch.inference_mode()`` make ordinary
    tensors (inference tensors have no version counter, which plans and programs key on: the first call raised
    torch's "Inference tensors do not track version counter"). Each model computes what the one built outside
    computes, and an in-place edit of a loaded program's weights made inside inference mode is seen; copies made
    there (``copy.deepcopy``, ``.double()``) run too."""
    x = torch.randn(2, 3, 8, 8)
    model = _net().eval()
    transformed = ipfx.transform(model, example_inputs=(x,))
    ipfx.prune(transformed, "magnitude", 0.5)
    frozen = ipfx.lower(transformed, target="fused", freeze=True)
    path = ipfx.deploy.save_program(frozen, tmp_path / "net", x)
    expected = frozen(x)
    with torch.inference_mode():
        inside = ipfx.transform(model, example_inputs=(x,))
        ipfx.prune(inside, "magnitude", 0.5)
        assert torch.allclose(inside(x), transformed(x), atol=1e-5)
        lowered = ipfx.lower(inside, target="fused", freeze=True)
        loaded = ipfx.deploy.load_module(path)
        for m in (lowered, loaded):
            assert not any(t.is_inference() for t in m.state_dict().values())
            assert torch.allclose(m(x), expected, atol=1e-5) and torch.allclose(m(x), expected, atol=1e-5)
        values = next(b for name, b in loaded.named_buffers() if name.endswith("values"))
        values.mul_(-1)  # (in place, inside inference mode: the program and plans see its new version)
        edited = loaded(x)
        # copies made inside inference mode hold inference tensors: each module replaces them by ordinary
        # copies on its first call (then its plans and the program key on them as on any other)
        copied, double = copy.deepcopy(lowered), copy.deepcopy(lowered).double()
        assert any(t.is_inference() for t in copied.state_dict().values())
        assert torch.allclose(copied(x), expected, atol=1e-5) and torch.allclose(copied(x), expected, atol=1e-5)
        assert torch.allclose(double(x.double()), expected.double(), atol=1e-5)
        assert not any(t.is_inference() for t in copied.state_dict().values())
        loaded_copy = copy.deepcopy(ipfx.deploy.load_module(path))
        assert torch.allclose(loaded_copy(x), expected, atol=1e-5) and torch.equal(loaded_copy(x), loaded_copy(x))
    assert not torch.allclose(edited, expected, atol=1e-3)
    assert torch.allclose(edited, type(loaded).forward.__wrapped__(loaded, x), atol=1e-6)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, pair):
        return self.conv(pair[0]) + self.conv(pair[1])


def test_a_call_with_other_arguments_than_saved_is_refused_saying_what_to_do(tmp_path):
    """A program takes its example's arguments: a keyword or an extra positional argument raises saying so and
    how to save one that takes them (torch's own: "Ran into a kwarg keyword mismatch", a tree spec); copies too."""
    x = torch.randn(2, 3, 8, 8)
    loaded = ipfx.deploy.load_module(ipfx.deploy.save_program(OptionalScale().eval(), tmp_path / "scaled", x))
    for program in (loaded, copy.deepcopy(loaded)):
        assert program(x[:1]).shape == (1, 4, 6, 6)  # the arguments it was saved with: any batch
        for args, kwargs, given in (((x,), {"scale": 2.0}, "1 positional and 'scale'"), ((x, x), {}, "2 positional")):
            with pytest.raises(IPFXValueError, match=rf"saved for calls with 1 positional argument\(s\), and is called "
                                                     rf"with {given}.*save_program\(model, stem, example\)"):
                program(*args, **kwargs)
    with_scale = ipfx.deploy.load_module(ipfx.deploy.save_program(OptionalScale().eval(), tmp_path / "s2", (x, torch.tensor(2.0))))
    assert with_scale(x, torch.tensor(3.0)).shape == (2, 4, 6, 6)
