"""Datasets as in-memory tensors: scikit-learn's digits (ships with the package, no network), MNIST,
CIFAR-10/100 in torchvision's on-disk formats, and image folders (``<root>/train/<class>/*`` and
``<root>/test/<class>/*``, e.g. the JPEG copy of CIFAR-10). Nothing is ever downloaded.

Images are kept as uint8 ``(N, C, H, W)`` tensors; :class:`Dataset` normalises batches and applies the
standard augmentation (random crop with 4-pixel padding and horizontal flip) for 32x32 colour data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import write_atomically
from ..errors import IPFXValueError
from .accel import to_device

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "folder")


@dataclasses.dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    scale: float  # raw pixel value of "white" (255, or 16 for digits)
    mean: torch.Tensor  # per channel, in [0, 1]
    std: torch.Tensor
    augment: bool
    fingerprint: str | None = dataclasses.field(default=None, repr=False)  # :attr:`identity`, once computed

    @property
    def identity(self) -> str:
        """The data's identity in a run's key: a hash of the images and labels as loaded (both splits,
        their shapes and the class count). Another folder, a file added, changed or removed, another
        download of the same files in another place: the images differ, so does the identity; the same
        data moved to another path keeps it. Computed once (about a second for CIFAR-10); a subset or a
        copy on another device keeps its dataset's identity (the subset's size is in the key itself)."""
        if self.fingerprint is None:
            digest = hashlib.sha256(f"{self.name}\0{self.num_classes}".encode())
            for t in (self.train_x, self.train_y, self.test_x, self.test_y):
                t = t.detach().cpu().contiguous()
                digest.update(f"\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                digest.update(memoryview(t.numpy()).cast("B"))
            self.fingerprint = digest.hexdigest()[:16]
        return self.fingerprint

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device) -> "Dataset":
        """This dataset with its images (still uint8) on ``device``: batches are then gathered, normalised
        and augmented there. The random draws (order, crops, flips) still come from the CPU generator the
        caller passes, so every device sees the same batches and a checkpoint's generator state resumes
        them; only the draws (a few numbers per image) travel to the device."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda t: t.to(device)  # noqa: E731
        return dataclasses.replace(self, train_x=move(self.train_x), train_y=move(self.train_y),
                                   test_x=move(self.test_x), test_y=move(self.test_y), mean=move(self.mean),
                                   std=move(self.std))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / self.scale
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def train_batches(self, batch_size: int, generator: torch.Generator):
        """One epoch of normalised, augmented, shuffled batches (the last partial batch is dropped)."""
        order = torch.randperm(len(self.train_y), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = to_device(order[i : i + batch_size], self.device)
            x = self.normalise(self.train_x[idx])
            if self.augment:
                x = _crop_flip(x, generator)
            yield x, self.train_y[idx]

    def test_batches(self, batch_size: int = 500):
        for i in range(0, len(self.test_y), batch_size):
            yield self.normalise(self.test_x[i : i + batch_size]), self.test_y[i : i + batch_size]

    def subset(self, n: int | None, seed: int = 0) -> "Dataset":
        """The first ``n`` training images of a fixed class-balanced shuffle (all when ``n`` is None)."""
        if n is None or n >= len(self.train_y):
            return self
        order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(seed))[:n]
        return dataclasses.replace(self, train_x=self.train_x[order], train_y=self.train_y[order])


def _crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random 4-pixel-padded crop and a random horizontal flip of every image of ``x``, computed on
    ``x``'s device by gathers (no host synchronisation); the draws come from the CPU ``generator``."""
    n, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (4, 4, 4, 4))
    dy = to_device(torch.randint(0, 9, (n,), generator=generator), dev)
    dx = to_device(torch.randint(0, 9, (n,), generator=generator), dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 8)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = torch.gather(out, 3, cols)
    flip = to_device(torch.rand(n, generator=generator) < 0.5, dev)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def load_dataset(name: str, root: str | os.PathLike | None = None, cache_dir: str | None = None) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`) from ``root`` (not needed for digits)."""
    if name == "digits":
        return _digits()
    if name not in DATASETS:
        raise IPFXValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if root is None:
        raise IPFXValueError(
            f"dataset {name!r} is read from disk: pass --data-root DIR (ipfx never downloads). "
            + _where(name)
        )
    root = Path(root).expanduser()
    if not root.exists():
        raise IPFXValueError(f"data root {str(root)!r} does not exist. " + _where(name))
    if name == "folder" or (root / "train").is_dir() and (root / "test").is_dir():
        return _image_folder(root, cache_dir)
    return _torchvision(name, root)


def _where(name: str) -> str:
    if name == "folder":
        return "An image folder needs DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg."
    cls = {"mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name]
    return (f"Put {name} in torchvision's format under DIR (on a machine with network: "
            f"torchvision.datasets.{cls}(DIR, download=True)), or pass an image folder with "
            "DIR/train/<class>/ and DIR/test/<class>/ (e.g. the CIFAR-10 JPEG archive, extracted).")


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise IPFXValueError("the digits dataset ships with scikit-learn: pip install 'ipfx[demo]'") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.uint8)[:, None]  # values 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    mean = (x[train].float() / 16).mean().reshape(1)
    std = (x[train].float() / 16).std().reshape(1)
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, 16.0, mean, std, augment=False)


def _torchvision(name: str, root: Path) -> Dataset:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
           "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise IPFXValueError(f"{name} not found under {str(root)!r} ({exc}). " + _where(name)) from None
    xs = []
    for ds in (train, test):
        data = torch.as_tensor(ds.data)
        xs.append(data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2).contiguous())
    ys = [torch.as_tensor(ds.targets, dtype=torch.int64) for ds in (train, test)]
    return _finish(name, xs[0], ys[0], xs[1], ys[1], len(train.classes))


def _image_folder(root: Path, cache_dir: str | None) -> Dataset:
    cache = _cache_path(root, cache_dir)
    if cache is not None and cache.exists():
        try:
            d = torch.load(cache, weights_only=True)
            return _finish(d["name"], d["train_x"], d["train_y"], d["test_x"], d["test_y"], d["num_classes"])
        except Exception:  # noqa: BLE001 - a cache cut short or written by something else: read the folder again
            pass
    import torchvision

    parts = []
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise IPFXValueError(f"{str(root / split)!r} is missing. " + _where("folder"))
        folder = torchvision.datasets.ImageFolder(str(root / split))
        images = [_rgb(path) for path, _ in folder.samples]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise IPFXValueError(f"images under {str(root / split)!r} have different sizes {sorted(shapes)[:3]}; "
                                 "resize them to one size first")
        parts += [torch.stack(images), torch.tensor(folder.targets, dtype=torch.int64)]
        classes = folder.classes
    name = "cifar10" if len(classes) == 10 and parts[0].shape[-1] == 32 else f"folder:{root.name}"
    if cache is not None:  # whole or not at all: a kill leaves no cache
        state = {"name": name, "train_x": parts[0], "train_y": parts[1], "test_x": parts[2], "test_y": parts[3],
                 "num_classes": len(classes)}
        write_atomically(cache, lambda f: torch.save(state, f))
    return _finish(name, *parts, len(classes))


def _rgb(path: str) -> torch.Tensor:
    """One image file as a uint8 (3, H, W) tensor (PIL: torchvision's own image decoding is deprecated)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


def _cache_path(root: Path, cache_dir: str | None) -> Path | None:
    if cache_dir == "":
        return None
    base = Path(cache_dir or os.environ.get("IPFX_CACHE", Path.home() / ".cache" / "ipfx"))
    return base / f"images-{root.name}-{folder_fingerprint(root)[:16]}.pt"


def folder_fingerprint(root: Path) -> str:
    """What an image folder holds, as a hash of every file's path below ``root``, size, modification time and
    change time: a file added, removed, replaced or edited gives another fingerprint (the cache key, and the
    data's identity in a run's key). The change time is the one a program cannot set back: a file replaced by
    another of the same size with the old modification time kept (``cp -p``, ``rsync -a``, ``tar x``, a
    coarse clock) still gives another fingerprint."""
    digest = hashlib.sha1(str(root.resolve()).encode())
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            stat = path.stat()
            digest.update(f"\0{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}"
                          .encode())
    return digest.hexdigest()


def _finish(name, train_x, train_y, test_x, test_y, num_classes) -> Dataset:
    scaled = train_x.float() / 255
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3))
    augment = train_x.shape[1] == 3 and train_x.shape[-1] == 32
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, 255.0, mean, std, augment)
