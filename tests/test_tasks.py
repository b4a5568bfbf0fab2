"""Built-in tasks: the embedded CIFAR-10 task and the ImageNet loading path."""
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from tta_bench.tasks.cifar10 import CIFAR10_GROUPS, Cifar10, balanced_order, load_cifar10
from tta_bench.tasks.imagenet import synsets

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError


def test_cifar10_groups_are_disjoint_imagenet_classes():
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    members = [i for g in CIFAR10_GROUPS.values() for i in g]
    assert list(CIFAR10_GROUPS) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                    "horse", "ship", "truck"]
    assert len(members) == len(set(members)) and all(0 <= i < 1000 for i in members)
    assert all(g for g in CIFAR10_GROUPS.values())
    assert categories[CIFAR10_GROUPS["cat"][0]] == "tabby" and categories[339] == "sorrel"
    assert set(range(151, 269)) == set(CIFAR10_GROUPS["dog"])  # every dog breed


def test_embedded_cifar10_data_is_the_full_test_set():
    images, labels = load_cifar10(Cifar10().path)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_sample_order_is_balanced_for_every_prefix_of_ten():
    labels = load_cifar10(Cifar10().path)[1]
    order = balanced_order(labels, 10)
    assert sorted(order.tolist()) == list(range(10000))
    assert np.bincount(labels[order[:2000]]).tolist() == [200] * 10
    assert labels[order[:10]].tolist() == list(range(10))


def test_test_and_val_subsets_are_disjoint_balanced_halves():
    labels = load_cifar10(Cifar10().path)[1]
    test, val = (Cifar10(subset=s).order(labels) for s in ("test", "val"))
    assert len(test) == len(val) == 5000 and not set(test.tolist()) & set(val.tolist())
    assert sorted([*test, *val]) == list(range(10000))
    assert np.bincount(labels[val[:500]]).tolist() == [50] * 10  # a prefix is balanced
    assert test[:2000].tolist() == balanced_order(labels, 10)[:2000].tolist()  # earlier runs' images
    meta_test, meta_val = Cifar10(subset="test").metadata(), Cifar10(subset="val").metadata()
    assert meta_test["subset_indices_sha256"] != meta_val["subset_indices_sha256"]


def test_cifar10_preprocessing_and_class_logits():
    task = Cifar10()
    raw = [torch.zeros(32, 32, 3, dtype=torch.uint8), torch.full((32, 32, 3), 255, dtype=torch.uint8)]
    x = task.collate(raw)
    assert x.shape == (2, 3, 224, 224)
    assert torch.allclose(x[0], torch.tensor(-127 / 128)) and torch.allclose(x[1], torch.tensor(1.0))
    z = torch.randn(2, 1000)
    logits = task.class_logits(lambda _: z, x)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits[:, 7], z[:, 339])  # horse = sorrel alone
    torch.testing.assert_close(logits[:, 3], z[:, 281:286].logsumexp(-1))


@pytest.mark.slow
def test_real_efficientnet_lite0_beats_chance_on_cifar10():
    result = tta_bench.run(Cifar10(), tta_bench.get_method("none"), Protocol((1e-3,), threshold=None),
                           RunOptions(limit=100, progress=False))
    assert result.summary[0]["acc_source"] > 40  # chance is 10%; ~57% on 500 images


def make_imagenet_folder(root, per_class=2, wnids=None):
    wnids = wnids or synsets()[:3]
    rng = np.random.default_rng(0)
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / wnid / f"img{j}.JPEG")
    return root


def test_imagenet_task_runs_on_generated_images(tmp_path):
    root = make_imagenet_folder(tmp_path / "val", wnids=[synsets()[i] for i in (0, 1, 999)])
    task = tta_bench.get_task("imagenet", model="resnet18", weights="none", data_dir=str(root))
    assert [s.label for s in task.samples()] == [0, 0, 1, 1, 999, 999]
    assert task.collate([s.raw for s in task.samples()][:2]).shape == (2, 3, 224, 224)
    result = tta_bench.run(task, tta_bench.get_method("ifo"), Protocol((0.01,), threshold=None),
                           RunOptions(batch_size=4, progress=False))
    assert len(result.rows) == 6 and result.rows.updated.all()
    assert result.metadata["task"]["n_images"] == 6


def test_imagenet_data_dir_from_environment(tmp_path, monkeypatch):
    root = make_imagenet_folder(tmp_path / "val", per_class=1)
    monkeypatch.setenv("TTA_BENCH_IMAGENET_DIR", str(root))
    assert tta_bench.get_task("imagenet").num_samples() == 3


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "no ImageNet data: pass --data-dir DIR or set TTA_BENCH_IMAGENET_DIR"),
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "cats").mkdir() or str(p), "not ImageNet-1k synsets: cats"),
    (lambda p: (p / "n01440764").mkdir() or str(p), r"no images \(.JPEG/.jpg/.png\)"),
])
def test_imagenet_missing_or_bad_data_is_a_clear_error(tmp_path, monkeypatch, setup, match):
    monkeypatch.delenv("TTA_BENCH_IMAGENET_DIR", raising=False)
    task = tta_bench.get_task("imagenet", data_dir=setup(tmp_path))
    with pytest.raises(TTAError, match=match):
        task.check()


def test_imagenet_bad_model_or_weights_names(tmp_path):
    with pytest.raises(TTAError, match="unknown torchvision classification model 'resnet5'"):
        tta_bench.get_task("imagenet", model="resnet5").weights
    with pytest.raises(TTAError, match="has no weights 'IMAGENET9K'; choose one of: IMAGENET1K_V1"):
        tta_bench.get_task("imagenet", model="resnet18", weights="IMAGENET9K").weights


def test_imagenet_weights_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torch.hub.urlopen", offline)
    task = tta_bench.get_task("imagenet", model="resnet18")
    with pytest.raises(TTAError, match=r"cannot load resnet18 IMAGENET1K_V1 weights: .*resnet18-f37072fd.pth "
                                       r"is not there and the download failed .*fetch https://"):
        task.load_model()


def test_imagenet_augmenter_round_trips_through_pixels(tmp_path):
    root = make_imagenet_folder(tmp_path / "val", per_class=1)
    task = tta_bench.get_task("imagenet", model="resnet18", weights="none", data_dir=str(root))
    x = task.collate([next(task.samples()).raw])
    views = task.augmenter()(x, 3)
    assert views.shape == (3, 3, 224, 224)
    mean, std = torch.tensor(task.transforms.mean)[:, None, None], torch.tensor(task.transforms.std)[:, None, None]
    pixels = views * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_cifar10_corruptions_are_deterministic_and_graded():
    from tta_bench.tasks.cifar10 import Cifar10

    from tta_bench.data.corruptions import CORRUPTIONS

    clean = next(Cifar10().samples()).raw.float()
    for name in CORRUPTIONS:
        first = [next(Cifar10(corruption=name, severity=s).samples()).raw for s in (1, 5)]
        again = next(Cifar10(corruption=name, severity=1).samples()).raw
        assert first[0].dtype == torch.uint8 and first[0].shape == (32, 32, 3)
        assert torch.equal(first[0], again), name  # the same image in every run
        change = [(x.float() - clean).abs().mean().item() for x in first]
        assert change[0] > 0 and change[1] > 0, (name, change)
        # CIFAR-10-C's own parameters are not graded for these two: elastic_transform's affine
        # jitter shrinks with severity; frost darkens the image as it adds frost
        if name not in ("elastic_transform", "frost"):
            assert change[0] < change[1], (name, change)  # severity 5 departs further than 1
    with pytest.raises(TTAError, match="corruption='fogg' is not allowed; choose one of: none, gaussian_noise"):
        Cifar10(corruption="fogg")
