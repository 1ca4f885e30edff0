"""The accelerator engine's pieces (``ipfx.experiments.accel``), exercised on CPU: on-device augmentation,
bf16 autocast, channels_last inputs, torch.compile and a training step without host synchronisation.
Where CUDA exists the same checks run there too."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ipfx.cli.main import main
from ipfx.experiments import Dataset, RunSpec, run
from ipfx.experiments.accel import Engine, LossMeter
from ipfx.experiments.data import _crop_flip

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def colours(n: int = 384, seed: int = 0) -> Dataset:
    """A learnable 32x32 colour task (so that augmentation is on): the class sets one channel's brightness."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n + 120,), generator=g)
    x = torch.randint(0, 120, (n + 120, 3, 32, 32), generator=g)
    x[torch.arange(len(y)), y] += 100
    x = x.to(torch.uint8)
    mean, std = torch.full((3,), 0.35), torch.full((3,), 0.2)
    return Dataset("colours", x[:n], y[:n], x[n:], y[n:], 3, 255.0, mean, std, augment=True)


SPEC = RunSpec(model="cnn", width=4, data="colours", method="gmp", sparsity=0.9, space="ip", epochs=2,
               batch_size=64)


def test_augmentation_is_a_padded_crop_and_a_flip_of_every_image():
    x = torch.randn(6, 3, 32, 32)
    got = _crop_flip(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order, applied image by image
    dy, dx = torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(6):
        want = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(got[i], want.flip(2) if flip[i] else want)
    assert flip.any() and not flip.all()


def test_bf16_channels_last_engine_trains_and_differs_only_by_rounding():
    data = colours()
    plain = run(SPEC, data, progress=False)
    fast = Engine(data_on_device=True, precision="bf16", channels_last=True)
    seen = []

    def spy(module, args):
        if args and isinstance(args[0], torch.Tensor):  # not the proxies of the capture
            seen.append(args[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(spy)
    try:
        rec = run(SPEC, data, progress=False, engine=fast)
    finally:
        handle.remove()
    assert rec["engine"]["precision"] == "bf16" and plain["engine"]["precision"] == "fp32"
    assert any(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in seen)
    assert rec["final_train_loss"] != plain["final_train_loss"]  # autocast was on
    assert rec["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=0.05)
    assert rec["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert rec["accuracy"] > 0.6 and abs(rec["accuracy"] - plain["accuracy"]) < 0.1


def test_compiled_training_matches_eager_and_sees_the_masks_the_schedule_changes():
    data = colours()
    eager = run(SPEC, data, progress=False, keep_model=True)
    torch._dynamo.reset()
    compiled = run(SPEC, data, progress=False, keep_model=True, engine=Engine(compile="aot_eager"))
    assert compiled["engine"]["compile"] == "aot_eager"
    masks = lambda r: {k: v for k, v in r["_model"].state_dict().items() if k.endswith(".mask")}  # noqa: E731
    a, b = masks(eager), masks(compiled)
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-4)
    assert compiled["accuracy"] == pytest.approx(eager["accuracy"], abs=0.02)


def test_a_training_step_does_not_wait_for_the_host(monkeypatch):
    """Reading a tensor's value on the host (item/float/int/bool) happens per epoch, not per step."""
    reads = []
    for name in ("item", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    data = colours(n=640)  # 10 steps per epoch

    def reads_in_a_run(epochs):
        spec = dataclasses.replace(SPEC, method="random", sparsity=0.0, epochs=epochs)  # no pruning: the loop alone
        before = len(reads)
        assert run(spec, data, progress=False)["steps"] == 10 * epochs
        return len(reads) - before

    extra = reads_in_a_run(6) - reads_in_a_run(3)  # what 30 more steps cost
    assert 0 < extra <= 2 * 3, reads


def test_loss_meter_adds_in_step_order_like_host_floats():
    losses = torch.rand(50, dtype=torch.float32)
    meter = LossMeter(1.25, torch.device("cpu"))
    host = 1.25
    for v in losses:
        meter.add(v)
        host += v.item()
    assert meter.read() == host


def test_default_engine_is_plain_on_cpu_and_options_are_checked():
    assert Engine.for_device("cpu") == Engine()
    assert Engine.for_device("cpu", "bf16", "inductor") == Engine(precision="bf16", compile="inductor")


@pytest.mark.parametrize("args, message", [
    (["--compile", "nosuch"], "unknown torch.compile backend 'nosuch'"),
    (["--precision", "fp16"], "unknown precision 'fp16'"),
])
def test_cli_rejects_bad_engine_options(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--data", "digits", "--out", str(tmp_path), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_trains_in_bf16_with_compile(tmp_path):
    out = tmp_path / "sweep"
    assert main(["compare", "--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "1",
                 "--batch-size", "256", "--methods", "random", "--sparsities", "0.9", "--spaces", "ip",
                 "--precision", "bf16", "--compile", "aot_eager", "--no-progress", "--out", str(out)]) == 0
    import json

    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["engine"]["precision"] == "bf16" and record["engine"]["compile"] == "aot_eager"


@CUDA
def test_cuda_engine_batches_equal_the_host_batches():
    data = colours()
    on_gpu = data.to("cuda")
    host = list(data.train_batches(64, torch.Generator().manual_seed(1)))
    dev = list(on_gpu.train_batches(64, torch.Generator().manual_seed(1)))
    assert len(host) == len(dev)
    for (hx, hy), (dx, dy) in zip(host, dev):
        assert dx.is_cuda and torch.allclose(hx, dx.cpu(), atol=1e-6) and torch.equal(hy, dy.cpu())


@CUDA
def test_cuda_run_uses_the_fast_engine():
    rec = run(SPEC, colours(), device="cuda", progress=False)
    assert rec["engine"]["data_on_device"] and rec["engine"]["channels_last"]
    assert rec["accuracy"] > 0.6


@pytest.mark.slow
def test_inductor_compiled_training_matches_eager():
    """The real compiler (C++ code generation on CPU): slow to compile, so not in the default run."""
    data = colours()
    eager = run(SPEC, data, progress=False)
    torch._dynamo.reset()
    compiled = run(SPEC, data, progress=False, engine=Engine(compile="inductor"))
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-3)
    assert compiled["accuracy"] == pytest.approx(eager["accuracy"], abs=0.03)
