"""Released -C data: the CIFAR-10-C reader (DIR/<corruption>.npy, DIR/labels.npy) and the ImageNet
task's two corrupted layouts (the ImageNet-C release, or plain val corrupted on the fly). Files are
made here in exactly the released layouts, with a small N: the official CIFAR-10-C has N = 10,000
test images, so 50,000 rows per corruption file (150 MB); the reader takes N from labels.npy."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import run_cli
from tta_bench.tasks.cifar10 import Cifar10, balanced_order
from tta_bench.tasks.imagenet import synsets

import tta_bench
from tta_bench import TTAError
from tta_bench.data import corruptions

N = 30  # test images per severity (10,000 in the official release)


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def make_cifar_c(folder, names=("contrast",), n=N, seed=0):
    """A CIFAR-10-C release: each row's pixels hold (severity, test index) so reads can be checked."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8)
    np.save(folder / "labels.npy", np.tile(labels, 5))
    rows = np.zeros((5 * n, 32, 32, 3), np.uint8)
    for s in range(5):
        rows[s * n:(s + 1) * n, :, :, 0] = s + 1
        rows[s * n:(s + 1) * n, :, :, 1] = np.arange(n)[:, None, None]
    for name in names:
        np.save(folder / f"{name}.npy", rows)
    return folder, labels


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a release read must not generate corruptions")
    monkeypatch.setattr(corruptions, "_apply", refuse)  # what every generated corruption goes through


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_cifar10_c_release_reads_the_severity_block_in_balanced_order(tmp_path, no_generation, severity):
    folder, labels = make_cifar_c(tmp_path / "CIFAR-10-C")
    task = Cifar10(data_dir=str(folder), corruption="contrast", severity=severity, subset="all")
    task.check()
    samples = list(task.samples())
    assert task.num_samples() == N == len(samples)
    assert [s.index for s in samples] == balanced_order(labels, 10).tolist()
    for s in samples:
        assert s.raw.dtype == torch.uint8 and s.raw.shape == (32, 32, 3)
        assert s.raw[0, 0, 0] == severity and s.raw[0, 0, 1] == s.index  # row (severity-1)·N + index
        assert s.label == labels[s.index]
    meta = task.metadata()
    assert meta["corruption_source"] == "release" and meta["data_file"] == str(folder / "contrast.npy")
    assert meta["release_rows"] == [(severity - 1) * N, severity * N] and meta["release_total_rows"] == 5 * N


def test_cifar10_c_release_alias_jpeg_reads_jpeg_compression(tmp_path, no_generation):
    folder, _ = make_cifar_c(tmp_path / "c", names=("jpeg_compression",))
    task = Cifar10(data_dir=str(folder), corruption="jpeg", severity=2)
    assert task.path.name == "jpeg_compression.npy" and next(task.samples()).raw[0, 0, 0] == 2


def test_cifar10_c_release_is_memory_mapped(tmp_path):
    from tta_bench.tasks.cifar10 import load_release
    folder, _ = make_cifar_c(tmp_path / "c")
    images, labels = load_release(folder, "contrast")
    assert isinstance(images, np.memmap) and images.shape == (5 * N, 32, 32, 3) and len(labels) == 5 * N


def test_generated_corruption_records_its_source():
    assert Cifar10(corruption="contrast").metadata()["corruption_source"] == "generated"
    assert Cifar10().metadata()["corruption_source"] == "none"


def test_cifar10_c_run_from_the_cli_records_the_release(capsys, tmp_path, no_generation):
    folder, _ = make_cifar_c(tmp_path / "c")
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--no-progress", "--method", "none", "--limit", "3",
                           "--data-dir", str(folder), "--corruption", "contrast", "--severity", "4",
                           "--out", str(out))
    assert code == 0, err
    task = json.loads((out / "run.json").read_text())["metadata"]["task"]
    assert task["corruption_source"] == "release" and task["severity"] == 4
    assert task["data_file"].endswith("contrast.npy") and task["release_rows"] == [3 * N, 4 * N]


def _save(path, array):
    np.save(path, array)


@pytest.mark.parametrize("make,argv,message", [
    (lambda d: (d / "labels.npy").unlink(), [], "has no labels.npy; expected a CIFAR-10-C release folder"),
    (lambda d: None, ["--corruption", "gaussian_noise"], "has no gaussian_noise.npy"),
    (lambda d: _save(d / "contrast.npy", np.zeros((5 * N, 32, 32), np.uint8)), [], f"holds uint8 [{5 * N}, 32, 32]"),
    (lambda d: _save(d / "contrast.npy", np.zeros((5 * N, 32, 32, 3), np.float32)), [], "holds float32"),
    (lambda d: _save(d / "labels.npy", np.zeros(5 * N - 5, np.uint8)),
     [], f"has {5 * N - 5} labels for the {5 * N} rows of contrast.npy"),
    (lambda d: (_save(d / "contrast.npy", np.zeros((12, 32, 32, 3), np.uint8)),
                _save(d / "labels.npy", np.zeros(12, int))),
     [], "has 12 rows, not 5 severities × N (50,000 in the official release)"),
    (lambda d: _save(d / "labels.npy", np.full(5 * N, 10)), [], "has labels outside 0..9"),
    (lambda d: _save(d / "labels.npy", np.zeros((5 * N, 2), np.int64)), [], "labels.npy holds int64"),
    (lambda d: (d / "contrast.npy").write_text("not an array"), [], "contrast.npy cannot be read as .npy"),
    (lambda d: np.savez(d / "contrast.npy", x=np.zeros(3)) or (d / "contrast.npy.npz").rename(d / "contrast.npy"),
     [], "is an .npz archive, not an .npy array"),
    (lambda d: None, ["--corruption", "none"], "has no clean images: pass --corruption NAME"),
    (lambda d: None, ["--data-file", "x.npz"], "not both"),
    (lambda d: None, ["--data-dir", ""], "--data-dir is empty"),
])
def test_bad_cifar10_c_release_is_one_line(capsys, tmp_path, make, argv, message):
    folder, _ = make_cifar_c(tmp_path / "c")
    make(folder)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--no-progress", "--data-dir", str(folder),
                           "--corruption", "contrast", *argv, "--out", str(out))
    assert code == 2 and message in err and one_line(err), err
    assert not out.exists()


def test_cifar10_c_data_dir_that_is_not_a_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--data-dir", str(tmp_path / "nope"),
                           "--corruption", "contrast", "--out", str(tmp_path / "o"))
    assert code == 2 and "is not a folder; expected a CIFAR-10-C release folder" in err and one_line(err), err


# ---- ImageNet-C -------------------------------------------------------------------------------

WNIDS = [synsets()[i] for i in (0, 7, 999)]


def make_images(folder, size, per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    for wnid in WNIDS:
        (folder / wnid).mkdir(parents=True)
        for j in range(per_class):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / wnid / f"ILSVRC2012_val_{j:08d}.JPEG", quality=95)
    return folder


def normalised(pixels: np.ndarray, transforms) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(transforms.mean)[:, None, None], torch.tensor(transforms.std)[:, None, None]
    return (x - mean) / std


def imagenet(root, **options):
    return tta_bench.get_task("imagenet", model="resnet18", weights="none", data_dir=str(root), **options)


def test_imagenet_c_release_is_only_normalised(tmp_path):
    make_images(tmp_path / "C" / "contrast" / "2", (224, 224))
    task = imagenet(tmp_path / "C", corruption="contrast", severity=2)
    task.check()
    samples = list(task.samples())
    assert task.source == ("release", tmp_path / "C" / "contrast" / "2")
    assert [s.label for s in samples] == [0, 0, 7, 7, 999, 999]
    x = task.collate([s.raw for s in samples[:3]])
    assert x.shape == (3, 3, 224, 224)
    with Image.open(samples[2].raw) as img:  # no resize, no crop: pixel for pixel the file
        torch.testing.assert_close(x[2], normalised(np.array(img.convert("RGB")), task.transforms))
    meta = task.metadata()
    assert meta["corruption_source"] == "release" and meta["images_dir"].endswith("contrast/2")
    for deeper in (tmp_path / "C" / "contrast", tmp_path / "C" / "contrast" / "2"):  # the folder of one corruption
        assert imagenet(deeper, corruption="contrast", severity=2).source == task.source
    assert "only normalised" in meta["transforms"]


def test_imagenet_c_release_image_of_another_size_is_unreadable(tmp_path):
    from tta_bench.core.task import UnreadableSample
    make_images(tmp_path / "C" / "fog" / "1", (256, 256), per_class=1)
    task = imagenet(tmp_path / "C", corruption="jpeg", severity=1)  # jpeg -> jpeg_compression: absent
    with pytest.raises(TTAError, match="neither an ImageNet-C release"):
        task.check()
    (tmp_path / "C" / "fog").rename(tmp_path / "C" / "jpeg_compression")
    task = imagenet(tmp_path / "C", corruption="jpeg", severity=1)
    with pytest.raises(UnreadableSample, match="is 256x256 px; ImageNet-C images are 224x224"):
        task.collate([next(task.samples()).raw])


def test_plain_val_is_corrupted_on_the_fly(tmp_path, monkeypatch):
    root = make_images(tmp_path / "val", (300, 260))
    calls = []

    def fake(image, name, severity, seed):
        calls.append((image.shape, image.dtype, name, severity, seed))
        return 255 - image

    monkeypatch.setattr(corruptions, "corrupt_imagenet", fake)
    task = imagenet(root, corruption="contrast", severity=4)
    task.check()
    samples = list(task.samples())
    assert task.source == ("generated", root) and task.metadata()["corruption_source"] == "generated"
    x = task.collate([s.raw for s in samples[2:5]])
    assert x.shape == (3, 3, 224, 224)
    assert calls == [((224, 224, 3), np.uint8, "contrast", 4, seed) for seed in (2, 3, 4)]  # seed = sample index
    from torchvision.transforms import v2
    with Image.open(samples[3].raw.path) as img:  # resize 256 (shorter side), center crop 224, corrupt
        pixels = np.array(v2.CenterCrop(224)(v2.Resize(256)(img.convert("RGB"))))
    torch.testing.assert_close(x[1], normalised(255 - pixels, task.transforms))


def test_plain_val_with_the_real_generator(tmp_path):
    task = imagenet(make_images(tmp_path / "val", (300, 260), per_class=1), corruption="gaussian_noise", severity=3)
    task.check()
    raws = [s.raw for s in task.samples()][:2]
    first, again = task.collate(raws), task.collate(raws)
    clean = imagenet(tmp_path / "val").collate([r.path for r in raws])
    assert first.shape == (2, 3, 224, 224) and torch.equal(first, again)  # seeded: the same in every run
    assert (first - clean).abs().mean() > 0.01


@pytest.mark.parametrize("layout,argv,message", [
    (lambda d: (d / "cats").mkdir(), ["--corruption", "contrast"],
     "is neither an ImageNet-C release ({d}/contrast/3/<wnid>/*.JPEG) nor ImageNet val to corrupt on the fly "
     "({d}/<wnid>/*.JPEG)"),
    (lambda d: (d / "contrast" / "1").mkdir(parents=True), ["--corruption", "contrast", "--severity", "2"],
     "ImageNet-C folder {d}/contrast has no severity folder 2"),
    (lambda d: (d / "contrast" / "5" / "cats").mkdir(parents=True), ["--corruption", "contrast", "--severity", "5"],
     "not ImageNet-1k synsets: cats"),
    (lambda d: (d / "contrast" / "5").mkdir(parents=True), [], "looks like an ImageNet-C release"),
])
def test_bad_imagenet_c_layout_is_one_line(capsys, tmp_path, layout, argv, message):
    root = tmp_path / "data"
    root.mkdir()
    layout(root)
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--task", "imagenet", "--model", "resnet18",
                           "--weights", "none", "--data-dir", str(root), *argv, "--out", str(tmp_path / "o"))
    assert code == 2 and message.format(d=root) in err and one_line(err), err
    assert not (tmp_path / "o").exists()


def test_imagenet_c_run_from_the_cli(capsys, tmp_path):
    make_images(tmp_path / "C" / "snow" / "5", (224, 224), per_class=1)
    name = "snow"
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--no-progress", "--task", "imagenet", "--model",
                           "resnet18", "--weights", "none", "--data-dir", str(tmp_path / "C"), "--corruption", name,
                           "--severity", "5", "--gate", "none", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["metadata"]["task"]["corruption_source"] == "release"
    assert record["metadata"]["task"]["n_images"] == 3 and len(record["summary"]) == 1
