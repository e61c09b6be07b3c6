import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import DataConfig
from core.data import BatchSource, find_source, load_images
from core.errors import UserError


def test_real_jpegs_are_center_cropped_and_resized(real_celeba, tmp_path):
    images = load_images(DataConfig(root=str(real_celeba.parent), max_images=6, cache_dir=str(tmp_path)), 64)
    assert images.images.shape == (6, 3, 64, 64) and images.images.dtype == np.uint8 and images.skipped == 0
    first = sorted(real_celeba.iterdir())[0]
    with Image.open(first) as img:
        assert img.size == (178, 218)  # aligned CelebA
        expected = np.asarray(img.convert("RGB").crop((0, 20, 178, 198)).resize((64, 64), Image.BICUBIC))
    np.testing.assert_array_equal(images.images[0].transpose(1, 2, 0), expected)


def test_corrupt_file_is_skipped_and_counted(synthetic_root, tmp_path):
    """A garbage file and a truncated JPEG are both skipped (PIL would decode the truncated one as grey fill if
    allowed to): exactly 2 skipped, and the set holds exactly the 3 good images, in order."""
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    good = sorted((synthetic_root / "img_align_celeba").iterdir())[:4]
    for src in good[:3]:
        shutil.copy(src, folder / src.name)
    (folder / "999999.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    data = good[3].read_bytes()
    (folder / "999998.jpg").write_bytes(data[: len(data) // 3])  # truncated file
    images = load_images(DataConfig(root=str(tmp_path / "celeba"), cache_dir=str(tmp_path / "cache")), 32)
    assert (len(images.images), images.skipped) == (3, 2)
    expected = []
    for src in good[:3]:
        with Image.open(src) as img:
            expected.append(np.asarray(img.convert("RGB").crop((0, 20, 178, 198)).resize((32, 32), Image.BICUBIC)))
    np.testing.assert_array_equal(images.images.transpose(0, 2, 3, 1), np.stack(expected))


def test_default_data_places_come_in_order_and_celeba_root_first(synthetic_root, tmp_path, monkeypatch):
    """No --data: $CELEBA_ROOT, ./data/celeba, data/celeba in the checkout, ../shared/data/celeba-subset; the
    first place that holds images wins, so an empty CELEBA_ROOT falls through to the next."""
    from studies.cli import REPO, data_roots
    from tests.conftest import write_synthetic_celeba
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CELEBA_ROOT", raising=False)
    rest = [Path("data/celeba"), REPO / "data/celeba", REPO.parent / "shared/data/celeba-subset"]
    assert data_roots() == rest
    monkeypatch.setenv("CELEBA_ROOT", str(synthetic_root))
    assert data_roots() == [synthetic_root, *rest]
    cfg = DataConfig(root="", cache_dir=str(tmp_path / "cache"), max_images=4)
    write_synthetic_celeba(tmp_path / "data" / "celeba", 2)
    assert find_source(cfg, data_roots()).path == synthetic_root / "img_align_celeba"
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CELEBA_ROOT", str(tmp_path / "empty"))
    source = find_source(cfg, data_roots())
    assert source.path.resolve() == tmp_path / "data" / "celeba" / "img_align_celeba" and len(source.names) == 2
    with pytest.raises(UserError, match="looked in nowhere"):  # the library alone looks nowhere by itself
        find_source(cfg)


def test_zip_is_read_in_place_and_matches_the_folder(synthetic_root, tmp_path):
    zpath = tmp_path / "img_align_celeba.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted((synthetic_root / "img_align_celeba").iterdir())[:10]:
            zf.write(p, f"img_align_celeba/{p.name}")
    from_zip = load_images(DataConfig(root=str(zpath), cache_dir=str(tmp_path / "c1")), 32)
    from_dir = load_images(DataConfig(root=str(synthetic_root), max_images=10, cache_dir=str(tmp_path / "c2")), 32)
    assert find_source(DataConfig(root=str(tmp_path))).kind == "zip"  # a folder holding the zip works too
    np.testing.assert_array_equal(from_zip.images, from_dir.images)


def test_cache_is_reused_and_a_truncated_cache_is_rebuilt(synthetic_root, tmp_path):
    cfg = DataConfig(root=str(synthetic_root), max_images=12, cache_dir=str(tmp_path))
    first = load_images(cfg, 32)
    expected = np.array(first.images)  # copy: the cache is memory-mapped and about to be damaged in place
    (npy,) = tmp_path.glob("*.npy")
    mtime = npy.stat().st_mtime_ns
    assert load_images(cfg, 32).key == first.key and npy.stat().st_mtime_ns == mtime  # not decoded again
    assert load_images(cfg, 16).key != first.key  # keyed by resolution
    npy.write_bytes(npy.read_bytes()[:1000])  # truncated by a crash or a full disk
    rebuilt = load_images(cfg, 32)
    np.testing.assert_array_equal(rebuilt.images, expected)
    assert not list(tmp_path.glob("*partial*"))


@pytest.mark.parametrize("root", ["missing-folder", "empty"])
def test_missing_or_empty_data_says_where_it_looked(tmp_path, root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no CelebA images found.*looked in.*Kaggle"):
        load_images(DataConfig(root=str(tmp_path / root), cache_dir=str(tmp_path / "c")), 32)


def test_all_corrupt_is_an_error_and_leaves_no_cache(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:06d}.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of the 3 images"):
        load_images(DataConfig(root=str(tmp_path), cache_dir=str(tmp_path / "c")), 32)
    assert not list((tmp_path / "c").glob("*"))


def test_batches_are_drawn_on_device_in_range_and_reproducible(synthetic_root, tmp_path):
    images = load_images(DataConfig(root=str(synthetic_root), cache_dir=str(tmp_path)), 32)
    a, b = (BatchSource(images.images, torch.device("cpu"), seed=3) for _ in range(2))
    x = a.next(8)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    torch.testing.assert_close(x, b.next(8))
    state = a.state_dict()
    nxt = a.next(8)
    a.load_state_dict(state)
    torch.testing.assert_close(a.next(8), nxt)
