"""Crafted ``.pt2`` archives: each kind that would make ``torch.export.load`` run code (or unpack far more
than the file holds) is refused by ``ipfx.deploy.load`` and ``ipfx inspect`` with one line, and runs nothing.

Every crafted file is first shown to be a real attack where that is safe to show: plain
``torch.export.load`` runs its payload (a marker file appears), so a refusal here is not vacuous.
"""

import io
import json
import os
import pathlib
import zipfile

import pytest
import torch
import torch.nn as nn

import ipfx.deploy
from ipfx.cli.main import main
from ipfx.program_files import UnsafeProgram, check_program


class Payload:
    """Unpickling this creates ``marker``: what a malicious file would do, made harmless."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture
def program(tmp_path) -> pathlib.Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    return ipfx.deploy.save_program(model, tmp_path / "good", torch.randn(2, 3, 8, 8))


def _rewrite(source: pathlib.Path, target: pathlib.Path, change, add=(), compress=None) -> pathlib.Path:
    """A copy of the archive with member bytes changed by ``change(relative name, bytes) -> bytes | None``
    (None drops the member) and members added (``(relative name, bytes)``)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        root = old.namelist()[0].split("/", 1)[0]
        for info in old.infolist():
            relative = info.filename.split("/", 1)[1]
            data = change(relative, old.read(info))
            if data is not None:
                new.writestr(info.filename, data, compress_type=compress(relative) if compress else zipfile.ZIP_STORED)
        for relative, data in add:
            new.writestr(f"{root}/{relative}", data)
    return target


def _weights_with_pickle(payload: bytes):
    def change(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            entry = config["config"]["0.weight"]
            entry["use_pickle"] = True
            entry["path_name"] = "weight_evil"
            return json.dumps(config).encode()
        return data
    return change, [("data/weights/weight_evil", payload)]


def _assert_attack(path: pathlib.Path, marker: pathlib.Path) -> None:
    """Plain ``torch.export.load`` runs the crafted file's payload (else the refusal test proves nothing)."""
    try:
        torch.export.load(path)
    except Exception:  # noqa: BLE001 - the payload is not a tensor; what matters is that it ran
        pass
    assert marker.exists(), f"{path.name} is not an attack on torch.export.load: the test proves nothing"
    marker.unlink()


def _assert_refused(path: pathlib.Path, marker: pathlib.Path, why: str, capsys) -> None:
    capsys.readouterr()  # what torch logged while the test showed the attack
    with pytest.raises(UnsafeProgram, match=why):
        ipfx.deploy.load(path)
    with pytest.raises(UnsafeProgram):
        ipfx.deploy.load(path, trust=True)  # trust is for pickles ipfx refuses, not for crafted programs
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is refused" in err and "Traceback" not in err
    assert not marker.exists(), "the payload ran"


def test_a_program_ipfx_saved_passes_and_loads(program):
    check_program(program)
    loaded = ipfx.deploy.load(program)
    x = torch.randn(3, 3, 8, 8)
    assert loaded.module()(x).shape == (3, 4, 6, 6)


def test_a_program_with_module_names_that_are_not_identifiers_passes(tmp_path):
    """Module names torch allows (a ModuleDict key "block1-0", as torchvision's regnet has) are names to the
    check of the program JSON, not code."""
    model = nn.Sequential(nn.ModuleDict({"block1-0": nn.Conv2d(3, 4, 3)})["block1-0"], nn.ReLU()).eval()
    holder = nn.Module()
    holder.blocks = nn.ModuleDict({"block1-0": model})
    holder.forward = lambda x: holder.blocks["block1-0"](x)
    path = ipfx.deploy.save_program(holder.eval(), tmp_path / "named", torch.randn(2, 3, 8, 8))
    assert "block1-0" in zipfile.ZipFile(path).read(next(n for n in zipfile.ZipFile(path).namelist()
                                                          if n.endswith("models/model.json"))).decode()
    check_program(path)


def test_a_weight_stored_as_a_pickle_is_refused(program, tmp_path, capsys):
    marker = tmp_path / "ran"
    change, add = _weights_with_pickle(_pickled(Payload(marker)))
    evil = _rewrite(program, tmp_path / "evil.pt2", change, add)
    _assert_attack(evil, marker)
    _assert_refused(evil, marker, "stored as a pickle", capsys)


def test_sample_inputs_that_are_not_plain_tensors_are_refused(program, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _rewrite(program, tmp_path / "evil.pt2",
                    lambda name, data: _pickled(Payload(marker)) if name.startswith("data/sample_inputs/") else data)
    _assert_attack(evil, marker)
    _assert_refused(evil, marker, "sample inputs", capsys)


def test_object_constants_and_legacy_weight_files_are_refused(program, tmp_path, capsys):
    marker = tmp_path / "ran"

    def opaque(name, data):
        if name.endswith("_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                "use_pickle": True, "tensor_meta": None}}}).encode()
        return data
    evil = _rewrite(program, tmp_path / "opaque.pt2", opaque, [("data/constants/opaque_obj_0", b"cos\nsystem\n.")])
    _assert_refused(evil, marker, "stored as a pickle|not a tensor constant", capsys)
    legacy = _rewrite(program, tmp_path / "legacy.pt2", lambda n, d: d, [("data/weights/model.pt", b"x")])
    _assert_refused(legacy, marker, "legacy pickled weight file", capsys)
    native = _rewrite(program, tmp_path / "aoti.pt2", lambda n, d: d, [("data/aotinductor/model/model.so", b"\x7fELF")])
    _assert_refused(native, marker, "native library", capsys)


def test_an_archive_that_unpacks_to_more_than_it_holds_is_refused(program, tmp_path, capsys):
    huge = bytes(64 << 20)  # 64 MiB of zeros: deflates to about 64 KiB
    bomb = _rewrite(program, tmp_path / "bomb.pt2", lambda name, data: huge if name == "data/weights/weight_0" else data,
                    compress=lambda name: zipfile.ZIP_DEFLATED if name == "data/weights/weight_0" else zipfile.ZIP_STORED)
    assert bomb.stat().st_size < len(huge) // 100
    _assert_refused(bomb, tmp_path / "ran", "compressed", capsys)

    def claims(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            config["config"]["0.weight"]["tensor_meta"]["sizes"] = [{"as_int": 1 << 30}]
            return json.dumps(config).encode()
        return data
    _assert_refused(_rewrite(program, tmp_path / "claims.pt2", claims), tmp_path / "ran", "declares", capsys)


def test_files_that_are_not_pt2_archives_are_refused(program, tmp_path, capsys):
    text = tmp_path / "notes.pt2"
    text.write_text("hello")
    _assert_refused(text, tmp_path / "ran", "not a zip archive", capsys)
    old = _rewrite(program, tmp_path / "old.pt2", lambda name, data: None if name == "archive_format" else data)
    _assert_refused(old, tmp_path / "ran", "pt2 archive format", capsys)
    broken = _rewrite(program, tmp_path / "broken.pt2",
                      lambda name, data: b"{nope" if name.endswith("_weights_config.json") else data)
    _assert_refused(broken, tmp_path / "ran", "is not JSON", capsys)


def _model_json(change):
    """A ``_rewrite`` change that edits the program JSON (models/model.json) by ``change(dict)``."""
    def edit(name, data):
        if name.startswith("models/") and name.endswith(".json"):
            model = json.loads(data)
            change(model)
            return json.dumps(model).encode()
        return data
    return edit


def _first(model, key):
    """The first dict in ``model`` that holds ``key``."""
    pending = [model]
    while pending:
        value = pending.pop(0)
        if isinstance(value, dict):
            if key in value:
                return value
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    raise AssertionError(f"no {key!r} in the program")


def _module_attack(path: pathlib.Path, marker: pathlib.Path) -> None:
    """Plain ``torch.export.load(path).module()`` runs the crafted file's payload (torch generates and runs
    source from the program's strings there)."""
    try:
        torch.export.load(path).module()
    except Exception:  # noqa: BLE001 - what matters is that it ran
        pass
    assert marker.exists(), f"{path.name} is not an attack on torch.export: the test proves nothing"
    marker.unlink()


def test_strings_torch_turns_into_code_are_refused(program, tmp_path, capsys):
    """The program JSON's symbolic sizes (sympy.sympify, which is eval), guards (exec'd as a function's
    source), the forward's argument names (pasted into the source torch.fx generates) and call targets
    (resolved from ``torch``, ``torch.os.system`` included): each is refused before torch reads it; the first
    two files are shown to be attacks on plain torch.export."""
    marker = tmp_path / "ran"
    touch = f"__import__('pathlib').Path('{marker}').touch()"

    def expression(model):
        _first(model, "expr_str")["expr_str"] = touch
    sized = _rewrite(program, tmp_path / "expr.pt2", _model_json(expression))
    _assert_attack(sized, marker)
    _assert_refused(sized, marker, "expr_str.* holds .*other than sympy", capsys)

    def guard(model):  # (newlines end the generated function: a statement of its own, run by .module())
        model["guards_code"].append(f"0 #\n, 'm')\n  return\n{touch}\ndef __(*args):\n  (0")
    guarded = _rewrite(program, tmp_path / "guard.pt2", _model_json(guard))
    _module_attack(guarded, marker)
    _assert_refused(guarded, marker, "guards_code", capsys)

    def quiet_guard(model):  # (an expression: it runs when the program is called)
        model["guards_code"].append(f"{touch} is None")
    _assert_refused(_rewrite(program, tmp_path / "guard2.pt2", _model_json(quiet_guard)), marker, "guards_code",
                    capsys)

    def argument(model):  # (pasted as it is into `def forward(self, ...)` of the source torch.fx generates)
        _first(model, "forward_arg_names")["forward_arg_names"] = [f"x={touch}"]
    named = _rewrite(program, tmp_path / "args.pt2", _model_json(argument))
    _assert_refused(named, marker, "the forward's argument .* is not an identifier", capsys)

    def enum(model):  # (torch's tree-spec decoder imports the module an "__enum__" object names)
        holder = _first(model, "in_spec")
        spec = json.loads(holder["in_spec"])
        spec[1]["context"] = json.dumps({"__enum__": True, "fqn": "this:s", "name": "x"})
        holder["in_spec"] = json.dumps(spec)
    _assert_refused(_rewrite(program, tmp_path / "enum.pt2", _model_json(enum)), marker, "in_spec.*__enum__", capsys)

    for i, name in enumerate(("torch.os.system", "torch.ops.higher_order.flat_apply")):
        def target(model, name=name):
            _first(model, "inputs")["target"] = name
        _assert_refused(_rewrite(program, tmp_path / f"target{i}.pt2", _model_json(target)), marker,
                        f"calls '{name}'", capsys)


def test_sample_input_keys_and_program_members_torch_reads_as_code_are_refused(program, tmp_path, capsys):
    """Sample inputs whose dict keys are not identifiers (torch pastes each input's path, keys included, into
    the source of the guards it runs: a key that closes the message's quotes is code); a program member under
    models/ that is not named .json (torch reads every member there as a program, whatever its suffix: this
    check would not have read it)."""
    key = "+str(__import__('os').getcwd())+"
    keyed = _rewrite(program, tmp_path / "keyed.pt2", lambda name, data: _pickled(((({key: torch.randn(2, 3, 8, 8)},),
                                                                                     {}))) if name.startswith(
        "data/sample_inputs/") else data)
    _assert_refused(keyed, tmp_path / "ran", "have a key .* not an identifier", capsys)
    renamed = _rewrite(program, tmp_path / "renamed.pt2", lambda name, data: None if name == "models/model.json"
                       else data, [("models/model.JSON", b"{}")])
    _assert_refused(renamed, tmp_path / "ran", "'models/model.JSON', which torch would read as a program", capsys)


def test_duplicate_and_damaged_members_are_refused(program, tmp_path, capsys):
    """Two members of one name (torch's zip reader and this check could read different copies); a member whose
    bytes do not match their checksum (torch does not check: a damaged weight would load and compute)."""
    config = "data/weights/model_weights_config.json"
    twice = _rewrite(program, tmp_path / "twice.pt2", lambda name, data: data, [(config, b"{}")])
    _assert_refused(twice, tmp_path / "ran", "two members of one name", capsys)
    damaged = tmp_path / "damaged.pt2"
    data = bytearray(program.read_bytes())
    with zipfile.ZipFile(program) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/weights/weight_0"))
        header = data[info.header_offset:info.header_offset + 30]  # (the local header: its own name and extra)
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
            int.from_bytes(header[28:30], "little")
    data[start] ^= 0x40  # (a bit of the weight's first number; the archive's structure intact)
    damaged.write_bytes(bytes(data))
    torch.export.load(damaged)  # (torch reads it without a word)
    _assert_refused(damaged, tmp_path / "ran", "checksum", capsys)
    folder = tmp_path / "folder.pt2"
    folder.mkdir()
    with pytest.raises(UnsafeProgram, match="is a directory"):  # (not "not a zip archive")
        ipfx.deploy.load(folder)


def test_the_image_folder_cache_follows_the_folders_contents(tmp_path):
    """The cache of an image folder is keyed by what the folder holds, not by its path: images added after
    a first read are read (the old cache served 40 of 120), and a cache cut short is read past."""
    from PIL import Image

    from ipfx.experiments import load_dataset

    def add(n: int, start: int) -> None:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                folder = tmp_path / "data" / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(start, start + n):
                    Image.new("RGB", (8, 8), (i % 255, 0, 0)).save(folder / f"{i}.png")

    add(10, 0)
    cache = tmp_path / "cache"
    first = load_dataset("folder", tmp_path / "data", cache_dir=str(cache))
    assert len(first.train_x) == 20
    add(20, 10)
    second = load_dataset("folder", tmp_path / "data", cache_dir=str(cache))
    assert len(second.train_x) == 60
    for path in cache.iterdir():
        path.write_bytes(path.read_bytes()[:100])  # a cache cut short (a kill while writing, a full disk)
    assert len(load_dataset("folder", tmp_path / "data", cache_dir=str(cache)).train_x) == 60


def test_images_replaced_with_their_old_sizes_and_times_are_read_again(tmp_path):
    """Images replaced by others of the same byte size, their old modification times put back (what cp -p,
    rsync -a or tar x give): the cache is not served (it was: the old pixels, and the old data identity)."""
    from PIL import Image

    from ipfx.experiments import load_dataset

    def write(value: int) -> None:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                folder = tmp_path / "data" / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(3):
                    Image.new("RGB", (8, 8), (value, 0, 0)).save(folder / f"{i}.bmp")  # (BMP: one size)

    write(10)
    cache = str(tmp_path / "cache")
    first = load_dataset("folder", tmp_path / "data", cache_dir=cache)
    stats = {p: p.stat() for p in (tmp_path / "data").rglob("*.bmp")}
    write(200)
    for path, stat in stats.items():
        assert path.stat().st_size == stat.st_size  # (the premise: the same sizes)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replaced = load_dataset("folder", tmp_path / "data", cache_dir=cache)
    fresh = load_dataset("folder", tmp_path / "data", cache_dir="")
    assert int(fresh.train_x.max()) == 200
    assert torch.equal(replaced.train_x, fresh.train_x), "the cache served the old images"
    assert replaced.identity != first.identity
