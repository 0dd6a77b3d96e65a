"""The image folder dataset and the image_autoencoding task on real files written with
Pillow: listing, decoding, crops, shuffling, unreadable files, missing splits."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fairseq  # noqa: F401  (first, so that the plugin registers its fairseq parts)
import fairseq_knnvq  # noqa: F401
from fairseq.data import data_utils

from fairseq_knnvq.data.image_folder import (
    ImageFolderDataset,
    find_split,
    list_image_folder,
)
from fairseq_knnvq.data.unreadable import UnreadableFileLog
from fairseq_knnvq.preparation.synthetic_images import write_synthetic_image_folder
from fairseq_knnvq.tasks.image_autoencoding import ImageAutoencodingConfig, ImageAutoencodingTask


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_synthetic_image_folder(str(root), {"train": 12, "val": 6}, size=40, seed=3)
    return str(root)


def write_corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG")


def test_synthetic_folder_is_imagenet_layout_and_structured(image_root):
    paths = list_image_folder(os.path.join(image_root, "train"))
    assert len(paths) == 12
    assert {os.path.basename(os.path.dirname(p)) for p in paths} == {"shapes", "stripes", "checkers"}
    assert any(p.endswith(".JPEG") for p in paths) and any(p.endswith(".png") for p in paths)
    for p in paths:
        pixels = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
        # Structured, not noise: neighbouring pixels are mostly equal or close.
        assert np.abs(np.diff(pixels, axis=1)).mean() < 40


def test_valid_split_finds_imagenet_val_folder(image_root):
    assert find_split(image_root, "valid") == list_image_folder(os.path.join(image_root, "val"))


def test_file_list_split(image_root, tmp_path):
    train = list_image_folder(os.path.join(image_root, "train"))
    lst = tmp_path / "mine.txt"
    rel = os.path.relpath(train[0], tmp_path)
    lst.write_text(f"# a comment\n{rel}\n\n{train[1]}\n")
    assert find_split(str(tmp_path), "mine") == [train[0], train[1]]


def test_missing_and_empty_splits_name_the_paths(image_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split 'test' not found.*test/"):
        find_split(image_root, "test")
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "train" / "cls" / "notes.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="holds no image file"):
        find_split(str(tmp_path), "train")
    (tmp_path / "valid.txt").write_text("# nothing\n")
    with pytest.raises(FileNotFoundError, match="file list .* is empty"):
        find_split(str(tmp_path), "valid")
    with pytest.raises(FileNotFoundError, match="does not exist; set task.data"):
        find_split(str(tmp_path / "nowhere"), "train")


def test_resize_shorter_side_and_centre_crop(tmp_path):
    # A 60x30 image: left half red, right half blue, a green column in the middle.
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    pixels[:, 29:31] = (0, 255, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    ds = ImageFolderDataset([str(path)], image_size=16, resize_size=20)
    image = ds[0]["image"]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    # Shorter side 30 -> 20 makes it 40x20; the centre 16x16 crop spans x 12..27 of 40,
    # so red on the left, blue on the right, green in the middle columns.
    assert image[0, :, 0].mean() > 0.9 and image[2, :, -1].mean() > 0.9
    assert image[1, :, 7:9].mean() > 0.0


def test_training_crops_are_random_per_epoch_and_reproducible(image_root):
    paths = find_split(image_root, "train")
    ds = ImageFolderDataset(paths, image_size=32, resize_size=40, augment=True, seed=5)
    ds.set_epoch(1)
    a = ds[0]["image"]
    assert torch.equal(a, ds[0]["image"])  # same seed, epoch, index: same crop
    again = ImageFolderDataset(paths, image_size=32, resize_size=40, augment=True, seed=5)
    again.set_epoch(1)
    assert torch.equal(a, again[0]["image"])
    crops = set()
    for epoch in range(1, 9):
        ds.set_epoch(epoch)
        crops.add(ds[0]["image"].numpy().tobytes())
    assert len(crops) > 2
    centre = ImageFolderDataset(paths, image_size=32, resize_size=40)
    assert torch.equal(centre[0]["image"], centre[0]["image"])


def test_shuffle_differs_per_epoch_seed():
    ds = ImageFolderDataset(["x.png"] * 50, image_size=8, shuffle=True)
    with data_utils.numpy_seed(1 + 1):
        first = ds.ordered_indices()
    with data_utils.numpy_seed(1 + 2):
        second = ds.ordered_indices()
    assert sorted(first) == list(range(50)) and not np.array_equal(first, second)
    assert np.array_equal(ImageFolderDataset(["x.png"] * 5, image_size=8).ordered_indices(), np.arange(5))


def test_unreadable_image_is_replaced_in_training_and_dropped_in_evaluation(image_root, tmp_path):
    paths = find_split(image_root, "train")[:4]
    bad = str(tmp_path / "cls" / "broken.JPEG")
    write_corrupt(bad)
    mixed = paths[:2] + [bad] + paths[2:]

    ds = ImageFolderDataset(mixed, image_size=32, on_unreadable="replace")
    item = ds[2]
    assert item["unreadable"][0][0] == bad
    assert torch.equal(item["image"], ds[3]["image"])  # the next readable image
    batch = ds.collater([ds[i] for i in range(len(mixed))])
    assert batch["net_input"]["images"].shape == (5, 3, 32, 32)
    assert [p for p, _ in batch["unreadable"]] == [bad]

    dropping = ImageFolderDataset(mixed, image_size=32, on_unreadable="drop")
    batch = dropping.collater([dropping[i] for i in range(len(mixed))])
    assert batch["net_input"]["images"].shape == (4, 3, 32, 32)
    assert batch["id"].tolist() == [0, 1, 3, 4]

    only_bad = ImageFolderDataset([bad, bad], image_size=32, on_unreadable="replace")
    with pytest.raises(RuntimeError, match="could not read any of 2 consecutive images"):
        only_bad[0]


def test_unreadable_log_warns_once_per_file(caplog):
    log = UnreadableFileLog("image")
    with caplog.at_level(logging.WARNING):
        log.note([("/data/a.JPEG", "OSError: broken")])
        log.note([("/data/a.JPEG", "OSError: broken"), ("/data/b.JPEG", "OSError: broken")])
    messages = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(messages) == 2 and "/data/a.JPEG" in messages[0] and "/data/b.JPEG" in messages[1]
    assert len(log) == 2


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="resize_size"):
        ImageFolderDataset(["a.png"], image_size=32, resize_size=16)
    with pytest.raises(ValueError, match="at least one image"):
        ImageFolderDataset([], image_size=32)


def test_task_loads_splits_and_batches_by_batch_size(image_root):
    cfg = ImageAutoencodingConfig(data=image_root, image_size=32, resize_size=36, train_subset="train", seed=1)
    task = ImageAutoencodingTask.setup_task(cfg)
    task.load_dataset("train")
    task.load_dataset("valid")
    train, valid = task.dataset("train"), task.dataset("valid")
    assert len(train) == 12 and len(valid) == 6
    assert train.augment and train.shuffle and not valid.augment and not valid.shuffle
    itr = task.get_batch_iterator(train, max_sentences=5, seed=1, epoch=1)
    batches = list(itr.next_epoch_itr(shuffle=True))
    assert sorted(b["net_input"]["images"].shape[0] for b in batches) == [2, 5, 5]
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(12))
    with pytest.raises(ValueError, match="set dataset.batch_size"):
        task.get_batch_iterator(train)
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        task.load_dataset("test")


def test_worker_processes_see_each_epoch_and_report_unreadable_files(image_root, tmp_path):
    """With data-loader workers the crops still follow (seed, epoch, index), and an
    unreadable file found in a worker reaches the main process in the batch."""
    root = tmp_path / "data"
    write_synthetic_image_folder(str(root), {"train": 6}, size=40, seed=4)
    bad = root / "train" / "shapes" / "zz_broken.JPEG"
    write_corrupt(str(bad))
    cfg = ImageAutoencodingConfig(data=str(root), image_size=32, resize_size=40, train_subset="train", seed=1)

    def crops(num_workers):
        task = ImageAutoencodingTask.setup_task(cfg)
        task.load_dataset("train")
        itr = task.get_batch_iterator(task.dataset("train"), max_sentences=4, seed=1, num_workers=num_workers, epoch=1)
        per_epoch, unreadable = [], []
        for _ in range(2):
            batches = list(itr.next_epoch_itr(shuffle=True))
            by_id = {}
            for b in batches:
                unreadable += [p for p, _ in b["unreadable"]]
                for i, image in zip(b["id"].tolist(), b["net_input"]["images"]):
                    by_id[i] = image
            per_epoch.append(by_id)
        return per_epoch, unreadable

    in_process, bad_main = crops(0)
    in_workers, bad_workers = crops(2)
    for epoch in range(2):
        for i in in_process[epoch]:
            assert torch.equal(in_process[epoch][i], in_workers[epoch][i])
    assert any(not torch.equal(in_workers[0][i], in_workers[1][i]) for i in in_workers[0])
    assert bad_main == bad_workers == [str(bad), str(bad)]  # once per epoch


def _palette_image(indices, colours, transparent=None):
    im = Image.fromarray(np.array(indices, dtype=np.uint8), "P")
    flat = [c for colour in colours for c in colour]
    im.putpalette(flat + [0] * (768 - len(flat)))
    if transparent is not None:
        im.info["transparency"] = transparent
    return im


def _levels(*pixels):
    """2x2 expected RGB levels (row-major pixels) as the (3, 2, 2) tensor in [-1, 1]."""
    grid = torch.tensor(pixels, dtype=torch.float32).reshape(2, 2, 3)
    return grid.permute(2, 0, 1).div(127.5).sub(1.0)


def _grey(*values):
    return _levels(*[(v, v, v) for v in values])


# (file name, image, expected levels): every mode Pillow opens, with values whose 8-bit
# RGB result is exact.
IMAGE_MODES = {
    "I;16": (
        "g16.png",
        lambda: Image.fromarray(np.array([[0, 257 * 128], [65535, 257 * 64]], np.uint16)),
        _grey(0, 128, 255, 64),
    ),
    "I": (
        "g32.tif",
        lambda: Image.fromarray(np.array([[0, 65535], [70000, 257 * 10]], np.int32)),
        _grey(0, 255, 255, 10),
    ),
    "F": ("f32.tif", lambda: Image.fromarray(np.array([[0.0, 0.2], [1.0, 2.0]], np.float32)), _grey(0, 51, 255, 255)),
    "P": (
        "pal.png",
        lambda: _palette_image([[0, 1], [2, 1]], [(10, 20, 30), (200, 0, 100), (0, 255, 0)]),
        _levels((10, 20, 30), (200, 0, 100), (0, 255, 0), (200, 0, 100)),
    ),
    "P+transparency": (
        "palt.png",
        lambda: _palette_image([[0, 1], [2, 1]], [(10, 20, 30), (200, 0, 100), (0, 0, 0)], 2),
        _levels((10, 20, 30), (200, 0, 100), (255, 255, 255), (200, 0, 100)),
    ),
    "CMYK": (
        "cmyk.tif",
        lambda: Image.fromarray(
            np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 255, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK"
        ),
        _levels((255, 255, 255), (0, 255, 255), (255, 0, 255), (0, 0, 0)),
    ),
    "RGBA": (
        "rgba.png",
        lambda: Image.fromarray(
            np.array([[[10, 20, 30, 255], [10, 20, 30, 0]], [[0, 0, 0, 51], [200, 100, 0, 102]]], np.uint8), "RGBA"
        ),
        _levels((10, 20, 30), (255, 255, 255), (204, 204, 204), (233, 193, 153)),
    ),
    "LA": (
        "la.png",
        lambda: Image.fromarray(np.array([[[0, 51], [100, 255]], [[7, 0], [255, 255]]], np.uint8), "LA"),
        _grey(204, 100, 255, 255),
    ),
    "L": ("l.png", lambda: Image.fromarray(np.array([[0, 7], [128, 255]], np.uint8), "L"), _grey(0, 7, 128, 255)),
    "1": (
        "bw.png",
        lambda: Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8), "L").convert("1"),
        _grey(0, 255, 255, 0),
    ),
}


@pytest.mark.parametrize("mode", sorted(IMAGE_MODES))
def test_every_image_mode_is_scaled_to_its_brightness_in_minus_one_to_one(mode, tmp_path):
    """The evaluation path (centre crop, no resize at this size): exact levels / 127.5 - 1."""
    name, make, expected = IMAGE_MODES[mode]
    path = str(tmp_path / name)
    make().save(path)
    with Image.open(path) as opened:  # the file really holds that mode
        assert opened.mode == mode.split("+")[0] or (mode == "I;16" and opened.mode.startswith("I;16"))
    image = ImageFolderDataset([path], image_size=2, augment=False)[0]["image"]
    assert image.shape == (3, 2, 2)
    assert torch.allclose(image, expected, atol=1e-6, rtol=0), (mode, image, expected)


def test_sixteen_bit_grey_keeps_mid_grey_near_zero(tmp_path):
    """The reported case: a 16-bit PNG of mid grey has mean ~0, not the saturated +1."""
    path = str(tmp_path / "mid.png")
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(path)
    image = ImageFolderDataset([path], image_size=8, augment=False)[0]["image"]
    assert torch.allclose(image, torch.full_like(image, 128 / 127.5 - 1), atol=1e-6, rtol=0)
