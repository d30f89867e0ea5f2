"""Tests for data.py and what it reads through: DICOM reading and VOI (dicom.py), the phantoms,
CLAHE and Otsu, the multi-crop augmentation, the pretraining stream, masking and collate. CPU,
offline."""
import csv
import functools
import itertools
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import dicom
import phantoms
import preprocess
import utils

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SHAPE = (8, 64, 48)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "arch"
    return phantoms.synthetic_archive(root, patients=2, seed=0, shape=(12, 96, 72))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """The same phantom written native, RLE and JPEG 2000, plus its expected display values."""
    root = tmp_path_factory.mktemp("vol")
    paths = {enc: phantoms.write_phantom_dicom(root / f"{enc}.dcm", SHAPE, enc, seed=3)
             for enc in ("native", "rle", "j2k")}
    vol, _ = phantoms.make_phantom(SHAPE, seed=3)
    return paths, phantoms.quantize(vol, 10) / 1023.0


def test_phantom_roundtrip_and_meta(volumes):
    paths, expected = volumes
    vol, meta = dicom.read_dbt(paths["native"])
    assert vol.dtype == np.float32 and vol.shape == SHAPE
    # LINEAR with c = 2^(b-1), w = 2^b is exactly x / (2^b - 1): the phantom comes back unchanged
    # (chest wall left)
    np.testing.assert_allclose(vol, expected, atol=1e-6)
    assert (meta["laterality"], meta["view"], meta["n_frames"]) == ("L", "CC", 8)
    assert meta["sop_class"] == dicom.BTO and meta["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert meta["pixel_spacing"] == [0.1, 0.1] and meta["slice_order"] == "stored"
    assert not meta["mirrored"]
    assert pydicom.dcmread(paths["native"]).pixel_array.shape == SHAPE


def test_encodings_identical(volumes):
    paths, _ = volumes
    ref, _ = dicom.read_dbt(paths["native"])
    for enc in ("rle", "j2k"):
        vol, meta = dicom.read_dbt(paths[enc])
        np.testing.assert_array_equal(vol, ref)
    assert meta["transfer_syntax"] == "1.2.840.10008.1.2.4.90"


def test_frames_match_full_read(volumes):
    paths, _ = volumes
    for enc in ("native", "j2k"):
        full, _ = dicom.read_dbt(paths[enc])
        part, _ = dicom.read_dbt(paths[enc], frames=[5, 2])
        np.testing.assert_array_equal(part, full[[5, 2]])


def test_voi_hand_calculations():
    x = np.array([0, 75, 75.5, 100, 124, 124.5, 200], np.float32)
    # LINEAR (PS3.3 C.11.2.1.2): c' = 99.5, w' = 49 -> 0 at or below 75, 1 above 124
    lin = dicom.apply_voi(x, 1, 0, 100, 50, "LINEAR")
    want = [0, 0, 0.5 / 49, 0.5 + 0.5 / 49, 0.5 + 24.5 / 49, 1, 1]
    np.testing.assert_allclose(lin, want, atol=1e-6)
    exact = dicom.apply_voi(x, 1, 0, 100, 50, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, np.clip((x - 100) / 50 + 0.5, 0, 1), atol=1e-6)
    sig = dicom.apply_voi(x, 2, -10, 100, 50, "SIGMOID")  # rescale first: 2x - 10
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-4 * (2 * x - 10 - 100) / 50)), rtol=1e-5)
    nominal = dicom.apply_voi(np.array([0, 1023]), 1, 0, None, None, "LINEAR", bits_stored=10)
    np.testing.assert_allclose(nominal, [0, 1])


def test_voi_is_every_step_in_float32_bit_for_bit():
    """apply_voi fuses the cast into its first step and skips a slope of 1 and an intercept of 0;
    the values stay those of every step done in float32 on a float32 copy, bit for bit (cached
    runs were read with these), for stored integers of each kind, a mirrored view, MONOCHROME1."""
    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int16, np.int32):
        stored = rng.integers(-900 if dtype != np.uint16 else 0, 3000, (7, 33)).astype(dtype)
        for x, args, invert in itertools.product(
                (stored, stored[:, ::-1]),
                ((1, 0, 1000, 900, "LINEAR"), (1, 0, 1000, 900, "LINEAR_EXACT"),
                 (2.5, -10, 1000, 900, "SIGMOID"), (1, 7, 1000, 900, "LINEAR"),
                 (0.5, 0, None, None, "LINEAR")), (False, True)):
            (slope, icpt, c, w), sigmoid = dicom._voi_row(*args, 12, dtype != np.uint16)
            want = x.astype(np.float32)
            for op, v in ((np.multiply, slope), (np.add, icpt), (np.subtract, c)):
                op(want, v, out=want)
            want = 1 / (1 + np.exp(want * (-4 / w))) if sigmoid else np.clip(want / w + 0.5, 0, 1)
            want = 1 - want if invert else want
            got = dicom.apply_voi(x, *args, 12, dtype != np.uint16, invert)
            assert got.dtype == np.float32 and np.array_equal(got, want), (dtype, args, invert)


def test_monochrome1_sigmoid_file(tmp_path):
    path = phantoms.write_phantom_dicom(tmp_path / "m1.dcm", SHAPE, "native", seed=1,
                                        monochrome1=True, voi_function="SIGMOID", laterality="L")
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    c, w = 0.4 * 1024, 0.5 * 1024  # what write_bto puts in the Shared FrameVOILUT for SIGMOID
    vol, meta = dicom.read_dbt(path)
    assert meta["invert"]
    np.testing.assert_allclose(vol, 1 - 1 / (1 + np.exp(-4 * (stored - c) / w)), atol=1e-5)


def test_pydicom_shipped_files():
    read = lambda name: dicom.read_dbt(TEST_FILES / name)[0]  # noqa: E731
    ref = read("MR_small.dcm")
    np.testing.assert_array_equal(read("MR_small_RLE.dcm"), ref)
    np.testing.assert_array_equal(read("MR_small_jp2klossless.dcm"), ref)
    np.testing.assert_array_equal(read("rtdose_rle.dcm"), read("rtdose.dcm"))
    assert read("rtdose.dcm").shape == (15, 10, 10) and read("JPEG2000.dcm").shape == (1, 1024, 256)
    cr = TEST_FILES / "dicomdirtests/77654033/CR1/6154"
    ds = pydicom.dcmread(cr)
    x = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # header window 1600/2800, then MONOCHROME1
    lin = np.clip((x - (1600 - 0.5)) / (2800 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(dicom.read_dbt(cr)[0][0], 1 - lin, atol=1e-5)
    for name, pkg in [("MR_small_jpeg_ls_lossless.dcm", "pyjpegls"),
                      ("JPEGLSNearLossless_16.dcm", "pyjpegls"),
                      ("SC_rgb_jpeg_gdcm.dcm", "pylibjpeg-libjpeg"),
                      ("JPGExtended.dcm", "pylibjpeg-libjpeg")]:
        with pytest.raises(ValueError, match=rf"{name}: transfer syntax .*install {pkg}"):
            read(name)
    with pytest.raises(ValueError, match="colour"):
        read("examples_ybr_color.dcm")


def test_legacy_folder_sorted_by_z(tmp_path, volumes):
    paths, expected = volumes
    src = pydicom.dcmread(paths["native"])
    series = tmp_path / "series"
    series.mkdir()
    for i in np.random.default_rng(0).permutation(SHAPE[0]):  # file names in shuffled order
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 64, 48, 10, 9, 0
        ds.ImagePositionPatient, ds.InstanceNumber = [0, 0, float(i)], int(i)
        ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope, ds.RescaleIntercept = 512, 1024, 1, 0
        ds.PixelData = src.pixel_array[i].astype("<u2").tobytes()
        ds.save_as(series / f"{(i * 7) % SHAPE[0]:03d}.dcm")
    vol, meta = dicom.read_dbt(series)
    assert meta["slice_order"] == "z" and meta["n_frames"] == SHAPE[0]
    np.testing.assert_allclose(vol, expected, atol=1e-6)
    # a folder scan sees the series as one volume, beside an ordinary multi-frame file; stray files
    # are ignored
    (series / ".DS_Store").write_bytes(b"\0\1")
    (series / "notes.txt").write_text("exported by PACS\n")
    (tmp_path / "bto.dcm").write_bytes(paths["native"].read_bytes())
    assert dicom.scan(tmp_path) == sorted([str(series), str(tmp_path / "bto.dcm")])
    stream = data.PretrainStream(tmp_path, global_size=28, local_size=14, adjacent_k=1,
                                 cache_dir=tmp_path / "c")
    item = next(iter(stream))
    assert stream.n_skipped == 0 and abs(int(item["slice_index"][0] - item["slice_index"][1])) == 1


def _slice_file(path, pixels, z, series="1.2.3.4", laterality=None):
    """One single-frame 64 x 48 slice at z (no position at all for z None: a 2-D image, as MG files
    are)."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 64, 48, 10, 9, 0
    ds.SeriesInstanceUID, ds.PixelData = series, pixels.astype("<u2").tobytes()
    if z is None:
        del ds.ImagePositionPatient
    else:
        ds.ImagePositionPatient = [0, 0, float(z)]
    if laterality:
        ds.ImageLaterality = laterality
    ds.save_as(path)


def test_scan_uid_names_mammograms_and_a_bad_slice(tmp_path, volumes):
    """UID-named exports are volumes; 2-D images of one series stay separate; one bad slice skips
    its series once."""
    paths, _ = volumes
    pixels = pydicom.dcmread(paths["native"]).pixel_array  # (8, 64, 48)
    (tmp_path / "export").mkdir()
    # storescp's naming: the "suffix" is .9465
    uid_named = tmp_path / "export" / "1.2.840.113619.2.55.3.9465"
    uid_named.write_bytes(paths["native"].read_bytes())
    assert dicom.scan(tmp_path / "export") == [str(uid_named)]
    mg = tmp_path / "mg"  # four 2-D views of one series, no ImagePositionPatient: four volumes
    mg.mkdir()
    for i, lat in enumerate("LLRR"):
        _slice_file(mg / f"{i}.dcm", pixels[i], None, laterality=lat)
    assert dicom.scan(mg) == [str(mg / f"{i}.dcm") for i in range(4)]
    with pytest.raises(ValueError, match="without ImagePositionPatient"):
        dicom.read_dbt(mg)  # named as a folder volume (a manifest may), it is refused, not stacked
    series = tmp_path / "export" / "0-series"  # sorts first: the stream's start-up probe reads it
    series.mkdir()
    for i in range(6):
        _slice_file(series / f"{i}.dcm", pixels[i], i)
    (series / "3.dcm").write_bytes(b"not a dicom")  # one broken slice
    # one series, not five 1-slice volumes
    assert dicom.scan(tmp_path / "export") == [str(series), str(uid_named)]
    stream = data.PretrainStream(tmp_path / "export", global_size=28, local_size=14,
                                 cache_dir=tmp_path / "c")
    assert stream.n_skipped == 1 and "3.dcm: not a readable DICOM" in stream.skipped[str(series)]


def test_orientation_rules(archive):
    row = next(csv.DictReader(open(archive / "exams.csv")))
    rcc = archive / row["RCC"]
    # stored chest wall right = the official R guess: no rotation
    vol, meta = dicom.read_dbt(rcc, view="rcc")
    raw, _ = dicom.read_dbt(rcc, view="rcc", frames=[0])
    assert not meta["rotated"] and dicom.edge_side(vol[0]) == "R"
    # header/view disagreement -> 180 deg rotation
    wrong, meta = dicom.read_dbt(rcc, view="lcc", frames=[0])
    assert meta["rotated"]
    np.testing.assert_array_equal(wrong[0], raw[0][::-1, ::-1])
    canon, meta = dicom.read_dbt(rcc)  # canonical: mirrored so the chest wall is on the left
    assert meta["mirrored"] and dicom.edge_side(canon[0]) == "L"
    np.testing.assert_array_equal(canon, vol[:, :, ::-1])


def test_bad_files_errors_and_stream_skips(tmp_path, volumes):
    paths, _ = volumes
    good = tmp_path / "good.dcm"
    good.write_bytes(paths["native"].read_bytes())
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "text.dcm").write_text("hello, not dicom")
    (tmp_path / "trunc.dcm").write_bytes(paths["native"].read_bytes()[:30000])
    sr = pydicom.dcmread(paths["native"])
    for k in ("PixelData", "Rows", "Columns", "BitsAllocated"):
        del sr[k]
    sr.save_as(tmp_path / "noimage.dcm")
    for name, msg in [("empty", "not a readable DICOM"), ("text", "not a readable DICOM"),
                      ("trunc", "cannot decode frame"), ("noimage", "no image")]:
        with pytest.raises(ValueError, match=rf"{name}\.dcm.*{msg}"):
            dicom.read_dbt(tmp_path / f"{name}.dcm")
    ds = data.PretrainStream(tmp_path, cache_dir=tmp_path / "cache", global_size=28, local_size=14,
                             n_local=2, shuffle_buffer=0)
    # two epochs over the 5 files: the stream keeps going
    items = [item for item, _ in zip(ds, range(20))]
    assert {i["volume"] for i in items} == {ds.paths.index(str(good))}
    assert ds.n_skipped == 4 and all(Path(p).name != "good.dcm" for p in ds.skipped)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.dcm").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable DICOM"):
        data.PretrainStream(bad, cache_dir=tmp_path / "cache")


def test_synthetic_archive_name_holds_its_shape(tmp_path, monkeypatch):
    """Other shape flags once got the archive of an earlier run (its name held only patients and
    seed)."""
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path))
    small, other = (phantoms.synthetic_archive(patients=1, seed=0, shape=shape)
                    for shape in [(4, 64, 48), (3, 32, 40)])
    assert small != other
    assert small == phantoms.synthetic_archive(patients=1, seed=0, shape=(4, 64, 48))
    vol, _ = dicom.read_dbt(next(other.rglob("*.dcm")))
    assert vol.shape == (3, 32, 40)
    # the hazard too, but the default adds nothing: archives written before it keep their names
    enriched = phantoms.synthetic_archive(patients=1, seed=0, shape=(4, 64, 48), hazard=0.08)
    assert enriched.name == small.name + "-h0.08" and "-h" not in small.name


def test_plan_cohort_is_the_written_exam_table_and_hazard_moves_only_onsets(tmp_path):
    """Tests read a cohort's labels from plan_cohort without writing a volume: it must be exactly
    what write_archive writes. A higher hazard divides each onset and changes no other draw."""
    root = phantoms.write_archive(tmp_path / "a", patients=12, seed=3, shape=(1, 16, 16),
                                  hazard=0.5)
    columns = ("patient", "density", "years_to_cancer", "years_of_followup")
    written = [[r[c] for c in columns] for r in utils.read_csv(root / "exams.csv")]
    planned = phantoms.plan_cohort(12, 3, hazard=0.5)
    assert written == [[p[c] for c in columns] for p in planned]
    assert any(p["years_to_cancer"] for p in planned) and not all(p["years_to_cancer"]
                                                                for p in planned)
    low = phantoms.plan_cohort(12, 3)  # phantoms.HAZARD, 0.03
    # as write_archive wrote them before plan_cohort and the hazard existed: explicit flags keep
    # their archives
    assert "".join(p["density"] for p in low) == "adccbacbdcbc"
    assert [p["years_to_cancer"] for p in low] == [""] * 3 + ["2.515", "", "1.199"] + [""] * 3 + [
        "1.549", "", ""]
    first = low[0]["views"]  # and each view's draws: glandular fraction, phantom seed
    assert first[0]["glandular"] == pytest.approx(0.101557, abs=1e-6)
    assert [v["seed"] for v in first] == [202139720, 70197375, 244108804, 371155109]
    assert [(p["density"], p["beta"]) for p in low] == [(p["density"], p["beta"]) for p in planned]
    both = [(float(a["years_to_cancer"]), float(b["years_to_cancer"])) for a, b in zip(low, planned)
            if a["years_to_cancer"] and b["years_to_cancer"]]  # 0.5 / 0.03 times earlier at 0.5
    assert len(both) == 3 and all(a == pytest.approx(b * 0.5 / 0.03, abs=0.01) for a, b in both)


def test_a_shard_of_only_unreadable_volumes_moves_on(tmp_path, volumes, monkeypatch):
    """Ranks x workers ~ volumes: some epoch gives a rank only the bad file. It reads on in the next
    epoch's shard instead of stopping the run; only a stream whose every volume failed gives up."""
    paths, _ = volumes
    (tmp_path / "a" / "good.dcm").parent.mkdir()
    (tmp_path / "a" / "good.dcm").write_bytes(paths["native"].read_bytes())
    (tmp_path / "a" / "empty.dcm").write_bytes(b"")
    for rank in (0, 1):  # 2 ranks, 1 volume each per epoch: one of them starts on empty.dcm
        monkeypatch.setattr(utils, "rank_world", lambda: (rank, 2))
        ds = data.PretrainStream(tmp_path / "a", cache_dir=tmp_path / "c", global_size=28,
                                 local_size=14, n_local=1, shuffle_buffer=0)
        shards = [ds.paths[ds.shard(e, rank, 2)[0]] for e in range(2)]
        items = [item for item, _ in zip(ds, range(3))]
        assert {ds.paths[i["volume"]] for i in items} == {str(tmp_path / "a" / "good.dcm")}, shards
    # only the bad file left: nothing to read, said once
    ds.paths.remove(str(tmp_path / "a" / "good.dcm"))
    with pytest.raises(ValueError, match="rank 1 worker 0: no readable volume"):
        next(iter(ds))


def test_memory_one_slice_vs_full(tmp_path):
    path = phantoms.write_phantom_dicom(tmp_path / "big.dcm", (60, 256, 192), "native")
    peaks = []
    for frames in ([30], None):
        tracemalloc.start()
        dicom.read_dbt(path, frames=frames)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[0] < 0.1 * peaks[1], peaks


def test_clahe_matches_skimage():
    from skimage.exposure import equalize_adapthist
    vol, _ = phantoms.make_phantom((3, 160, 120), glandular=0.5, mlo=True, seed=2)
    rng = np.random.default_rng(0)
    for img, kw in [(vol[1], {}), (rng.random((97, 131)), dict(clip_limit=0.02, kernel_size=16)),
                    (vol[1], dict(clip_limit=0)), (np.linspace(0, 1, 64 * 80).reshape(64, 80), {})]:
        ours, ref = preprocess.clahe(img, **kw), equalize_adapthist(img, **kw)
        assert np.abs(ours - ref).mean() < 0.01, (kw, np.abs(ours - ref).mean())
    assert (preprocess.clahe(np.full((32, 32), 0.3)) == 0).all()


def _clahe_images():
    """(name, image, kwargs) for test_clahe_full_size_matches_skimage: sizes that are no multiple
    of 8, odd sides, kernels given, and blocks of contrasting texture so that adjacent tiles' maps
    differ by most of the grey range (a bilinear weight one pixel off then shows)."""
    rng = np.random.default_rng(7)
    blocks = np.kron(rng.random((16, 13)), np.ones((80, 80)))  # (1280, 1040) piecewise flat
    big = np.clip(blocks[:1229, :998] + rng.normal(0, 0.08, (1229, 998)), 0, 1).astype(np.float32)
    vol, _ = phantoms.make_phantom((3, 257, 199), glandular=0.5, seed=3)
    return [("1229x998 default", big, {}),
            ("1229x998 kernel 40x56", big, dict(kernel_size=(40, 56))),
            ("phantom 257x199 kernel 24", vol[1], dict(kernel_size=24, clip_limit=0.02)),
            ("odd 333x217 float64 kernel 31x17", rng.random((333, 217)) ** 3,
             dict(kernel_size=(31, 17))),
            ("kernel beyond image 37x17", rng.random((37, 17)).astype(np.float32),
             dict(kernel_size=40)),
            ("no clipping 301x255", big[:301, :255], dict(clip_limit=0, kernel_size=32))]


def test_clahe_full_size_matches_skimage():
    from skimage.exposure import equalize_adapthist
    for name, img, kw in _clahe_images():
        ours, ref = preprocess.clahe(img, **kw), equalize_adapthist(img, **kw)
        assert ours.dtype == np.float32 and ours.shape == img.shape, name
        assert np.abs(ours - ref).max() <= 0.01, (name, np.abs(ours - ref).max())
    for shape in [(1229, 998), (33, 17)]:
        assert (preprocess.clahe(np.full(shape, 0.7, np.float32), kernel_size=8) == 0).all()


def test_otsu_matches_skimage():
    from skimage.filters import threshold_otsu
    vol, _ = phantoms.make_phantom((3, 128, 96), seed=4)
    rng = np.random.default_rng(1)
    for img in [vol[1], np.concatenate([rng.normal(0.2, 0.05, 500), rng.normal(0.7, 0.1, 300)])]:
        width = (img.max() - img.min()) / 256
        assert abs(preprocess.otsu_threshold(img) - threshold_otsu(img)) <= width
    assert preprocess.otsu_threshold(np.full(10, 0.25)) == 0.25


def test_tissue_mask_matches_phantom():
    vol, _ = phantoms.make_phantom((5, 128, 96), seed=5)
    mask = preprocess.tissue_mask(vol[2])
    truth = vol[2] > 0
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95  # IoU with the phantom's outline


def _mean_global_tissue(archive, tmp_path, **kw):
    ds = data.PretrainStream(archive, cache_dir=tmp_path, global_size=56, local_size=28, n_local=1,
                             seed=0, **kw)
    return float(torch.stack([i["global_tissue"].mean() for i, _ in zip(ds, range(48))]).mean())


def test_tissue_aware_crops(archive, tmp_path):
    aware = _mean_global_tissue(archive, tmp_path, tissue_aware=True, min_tissue_global=0.6)
    uniform = _mean_global_tissue(archive, tmp_path)
    assert aware >= 0.6 > uniform, (aware, uniform)


def test_adjacent_pairs(archive, tmp_path, monkeypatch):
    ds = data.PretrainStream(archive, cache_dir=tmp_path, global_size=56, local_size=28, n_local=1,
                             adjacent_k=2)
    # geometry only
    monkeypatch.setattr(ds.multicrop, "_photo", lambda x, rng, *photo: x.expand(3, -1, -1))
    items = [i for i, _ in zip(ds, range(24))]
    for i in items:
        s, s2 = i["slice_index"].tolist()
        assert 1 <= abs(s - s2) <= 2 and i["adjacent"].shape == i["global_crops"].shape
        assert torch.equal(i["adjacent"][0], i["global_crops"][0])  # s: global crop 1's geometry
    same = np.mean([(i["adjacent"][0] - i["adjacent"][1]).abs().mean() for i in items])
    other = np.mean([(a["adjacent"][0] - b["adjacent"][1]).abs().mean()
                     for a, b in zip(items, items[1:])])
    assert same < 0.5 * other  # same crop box on a neighbouring slice, not a fresh crop


def test_adjacent_pairs_in_thin_volumes(tmp_path):
    """A 2-slice volume always pairs s with the other slice (clamping gave s' = s); a 1-slice image
    (FFDM) pairs with itself, and collate marks it so the adjacent-slice term leaves it out."""
    (tmp_path / "v").mkdir()
    for n in (1, 2):
        phantoms.write_phantom_dicom(tmp_path / "v" / f"s{n}.dcm", (n, 64, 48), seed=n)
    ds = data.PretrainStream(tmp_path / "v", cache_dir=tmp_path / "c", global_size=28,
                             local_size=14, n_local=1, adjacent_k=2)
    items = [i for i, _ in zip(ds, range(40))]
    thin = {ds.paths[i["volume"]][-6:]: set() for i in items}
    for i in items:
        thin[ds.paths[i["volume"]][-6:]].add(tuple(i["slice_index"].tolist()))
    assert thin == {"s1.dcm": {(0, 0)}, "s2.dcm": {(0, 1), (1, 0)}}
    out = data.collate_pretrain(items[:6], patch_size=14)
    has = [float(ds.paths[i["volume"]].endswith("s2.dcm")) for i in items[:6]]
    assert out["adjacent_valid"].tolist() == has + has  # crop-major: [crop 1 of all; crop 2 of all]


PIXELS = ("global_crops", "local_crops", "adjacent")  # the crops, in the order MultiCrop cuts them


def record_crops(multicrop):
    """Spies on multicrop._crop: each call's (box, flip, size, pyramid level, crop before the
    photometry), in call order."""
    calls, crop = [], multicrop._crop

    def spy(levels, box, flip, size):
        out = crop(levels, box, flip, size)
        calls.append((tuple(box), bool(flip), size, multicrop._level(box, size), out))
        return out

    multicrop._crop = spy
    return calls


def crop_levels(item, calls):
    """{key: the pyramid level of each of its crops} for the item whose calls these are."""
    n = len(item["local_crops"])
    levels = [c[3] for c in calls]
    return {"global_crops": levels[:2], "local_crops": levels[2:2 + n], "adjacent": levels[2 + n:]}


def assert_crops_close(crops, ref, levels, where, level0=2.5e-7):
    """Crops resampled from the slice itself (level 0) within level0 of ref (the direct path: a few
    float32 ulps, as other CPUs' kernels round differently; the pyramid's own kernel: its float
    rounding); from a smaller pyramid level, within mean abs 0.005, max 0.03."""
    assert len(crops) == len(ref) == len(levels), where
    for i, (x, want, level) in enumerate(zip(crops, ref, levels)):
        d = (x - want).abs()
        if level:
            assert d.mean() <= 0.005 and d.max() <= 0.03, (where, i, level, d.mean(), d.max())
        else:
            assert d.max() <= level0, (where, i, d.max())


def test_multicrop_reproduces_the_saved_samples(tmp_path):
    """MultiCrop makes the draws of PretrainStream.sample before the augmentation became its own
    class, in the same order: for the saved seeds every box, flip, mask and index equals
    tests/fixtures/multicrop.pt, and so does the stream's sample(), which goes through MultiCrop.
    The direct path (pyramid=False) gives the saved pixels to a few float32 ulps; the pyramid those
    of crops at level 0 to its kernel's rounding (2e-5), of smaller levels (at these sizes,
    dbt-dino's local crops) within its tolerance. mammodino's entries were saved again when its
    adjacent pair got its own photometry (issue 22): its first sample's main crops did not move."""
    ref = torch.load(Path(__file__).parent / "fixtures" / "multicrop.pt", weights_only=True)
    path = phantoms.write_phantom_dicom(tmp_path / "v.dcm", (6, 140, 112), "native", seed=7)
    meta, mask = data.volume_index(path, tmp_path / "idx")
    S, stride = meta["n_frames"], meta["mask_stride"]
    read = functools.partial(data.read_slice, meta)
    used = set()  # (recipe, key) with a crop from a smaller pyramid level
    for recipe, pyramid in itertools.product(("dinov2", "dbt-dino", "mammodino"), (False, True)):
        # margin 2.5 (the default until issue 23's last changes): these small crops then use
        # smaller levels too (at the default 4 none does), and stay within the tolerance
        sizes = dict(global_size=28, local_size=14, n_local=3, pyramid=pyramid, mip_margin=2.5,
                     **data.RECIPES[recipe])
        multicrop = data.MultiCrop(**sizes)
        stream = data.PretrainStream(tmp_path, cache_dir=tmp_path / "idx", **sizes)
        made = {}
        for via_stream in (False, True):
            calls = record_crops(stream.multicrop if via_stream else multicrop)
            rng = np.random.default_rng([11, 3])
            for k in range(3):
                del calls[:]
                if via_stream:
                    item = stream.sample(meta, mask, rng)
                else:
                    s = int(rng.integers(S))  # the stream's draw of the slice comes first
                    item = multicrop(read(s), mask, stride, rng, s, S, read)
                keys = {key.split("/")[2] for key in ref if key.startswith(f"{recipe}/{k}/")}
                assert set(item) == keys, (recipe, k, set(item), keys)
                levels = crop_levels(item, calls)
                for key, v in item.items():
                    saved = ref[f"{recipe}/{k}/{key}"]
                    where = (recipe, pyramid, via_stream, k, key)
                    assert v.dtype == saved.dtype and v.shape == saved.shape, where
                    if key in PIXELS:
                        level0 = 2e-5 if pyramid else 2.5e-7
                        assert_crops_close(v, saved, levels[key], where, level0)
                        used.update((recipe, key) for level in levels[key] if level)
                    else:
                        assert torch.equal(v, saved), where
                    # on one machine, the stream and MultiCrop alone are bit-identical
                    assert torch.equal(v, made.setdefault((k, key), v)), where
            # as many draws made: the next one matches (saved as the fixture saved it, in float32)
            next_draw = torch.tensor(rng.random())
            assert torch.equal(next_draw, ref[f"{recipe}/next_draw"]), (recipe, via_stream)
    assert used == {("dbt-dino", "local_crops")}, used


def test_pyramid_crops_match_the_direct_resize(tmp_path):
    """On a 512 x 400 slice (global 112, local 12: pyramid levels 0, 1 and 2 all serve crops at
    the default margin; not upsampled from a smaller phantom, whose 2x2 blocks would make level 1
    exact) the pyramid changes no box, flip, tissue grid, slice or draw of the direct path
    (pyramid=False), and its crops (before the photometry, which may stretch differences 2x) stay
    within mean abs 0.005, max 0.03 of the direct resize: dbt-dino's of the slice, mammodino's of
    its CLAHE (which sharpens edges: margin 2.5 was 0.061 off on full-size slices)."""
    path = phantoms.write_phantom_dicom(tmp_path / "v.dcm", (4, 512, 400), "native", seed=2)
    meta, mask = data.volume_index(path, tmp_path / "idx")
    levels_seen = set()
    for recipe in ("dbt-dino", "mammodino"):
        read = functools.partial(data.read_clahe if recipe == "mammodino" else data.read_slice,
                                 meta)
        sizes = dict(global_size=112, local_size=12, n_local=6, **data.RECIPES[recipe])
        runs = {}
        for pyramid in (False, True):
            multicrop = data.MultiCrop(pyramid=pyramid, **sizes)
            calls, rng = record_crops(multicrop), np.random.default_rng(5)
            items = [multicrop(read(s), mask, meta["mask_stride"], rng, s, 4, read)
                     for s in (0, 1, 3)]
            runs[pyramid] = items, calls, rng.random()
        (direct, direct_calls, next_direct), (ours, calls, next_ours) = runs[False], runs[True]
        assert next_ours == next_direct  # the same number of draws
        assert [c[:3] for c in calls] == [c[:3] for c in direct_calls]  # boxes, flips, sizes
        for a, b in zip(ours, direct):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a if k not in PIXELS), recipe
        for (_, _, h, w), _, size, level in (c[:4] for c in calls):  # the smallest level allowed
            side = min(h, w) / (data.MultiCrop.MIP_MARGIN * size)  # 2**level <= side < 2**(level+1)
            assert (level == 0 or side >= 2 ** level) and side < 2 ** (level + 1), (h, w, level)
        crops, want = [c[4] for c in calls], [c[4] for c in direct_calls]
        assert_crops_close(crops, want, [c[3] for c in calls], recipe, level0=2e-5)
        levels_seen.update(c[3] for c in calls)
    assert levels_seen == {0, 1, 2}, levels_seen


def test_pyramid_level_and_resample_from_the_slice_itself():
    """_half is the 2x2 mean (odd last row and column left out); _resample at level 0 is torch's
    antialiased bicubic resize of the box, shrinking or enlarging, flipped or not."""
    x = torch.rand(37, 30, generator=torch.Generator().manual_seed(0))
    want = x[:36].reshape(18, 2, 15, 2).mean((1, 3))
    assert torch.allclose(data._half(x), want, atol=1e-7)
    for t, l, h, w in [(3, 5, 29, 22), (10, 2, 6, 5)]:
        crop = F.interpolate(x[None, None, t:t + h, l:l + w], size=(9, 9), mode="bicubic",
                             align_corners=False, antialias=True)[0, 0]
        for flip in (False, True):
            ours = data._resample(x, (t, l, h, w), 9, 0, flip)
            assert torch.allclose(ours, crop.flip(-1) if flip else crop, atol=1e-6), (h, flip)


def test_read_slice_is_read_dbt_for_every_variant(archive, tmp_path):
    """read_slice (apply_voi on the mirrored view, no other copy) is dicom.read_dbt's canonical
    slice bit for bit, for every encoding, VOI and MONOCHROME variant, mirrored or not."""
    kinds = set()
    for path in sorted(archive.rglob("*.dcm"))[:8]:
        meta, _ = data.volume_index(path, tmp_path)
        for s in (0, meta["n_frames"] - 1):
            want = torch.from_numpy(dicom.read_dbt(path, frames=[s], meta=meta)[0][0])
            assert torch.equal(data.read_slice(meta, s), want), (path, s)
        kinds.add((meta["voi"][0][4], meta["invert"], meta["flip"]))
    assert {k[0] for k in kinds} == {"LINEAR", "SIGMOID", "LINEAR_EXACT"}, kinds
    assert {k[1] for k in kinds} == {k[2] for k in kinds} == {False, True}, kinds


def test_sharding_two_ranks_two_workers(archive, tmp_path):
    ds = data.PretrainStream(archive, cache_dir=tmp_path)
    for n in (8, 7):
        ds.paths = [f"v{i}" for i in range(n)]
        for epoch in (0, 1):
            shards = [ds.shard(epoch, r, 2, w, 2) for r in range(2) for w in range(2)]
            # equal counts: DDP ranks run the same number of steps
            assert len({len(s) for s in shards}) == 1
            flat = sum(shards, [])
            # all covered; exactly once when n | 4
            assert set(flat) == set(range(n)) and (n % 4 or len(flat) == n)
        assert ds.shard(0, 1, 2, 0, 2) == ds.shard(0, 1, 2, 0, 2) != ds.shard(1, 1, 2, 0, 2)


def test_stream_deterministic(archive, tmp_path):
    def make():
        return data.PretrainStream(archive, cache_dir=tmp_path, global_size=28, local_size=14,
                                   n_local=1)

    a, b = [[i for i, _ in zip(make(), range(6))] for _ in range(2)]
    assert all(torch.equal(x["global_crops"], y["global_crops"]) for x, y in zip(a, b))


def test_stream_clahe_equalises_each_slice_read_before_cropping(archive, tmp_path):
    """clahe=True: the same draws as without, on preprocess.clahe of each slice read (the
    neighbour too), so its crops equal MultiCrop's of the equalised slices."""
    kw = dict(cache_dir=tmp_path, global_size=28, local_size=14, n_local=1, adjacent_k=1)
    plain, equalised = (data.PretrainStream(archive, clahe=c, **kw) for c in (False, True))
    meta, mask = plain._index(plain.paths[0], plain.paths[0])
    for rng_seed in (0, 1):
        got = equalised.sample(meta, mask, np.random.default_rng(rng_seed))
        rng = np.random.default_rng(rng_seed)
        s = int(rng.integers(meta["n_frames"]))

        def read(k):
            return torch.from_numpy(preprocess.clahe(data.read_slice(meta, k).numpy()))
        want = plain.multicrop(read(s), mask, meta["mask_stride"], rng, s, meta["n_frames"],
                               read)
        assert got["slice_index"][0] == s
        for k in ("slice_index", "global_crops", "local_crops", "adjacent"):
            assert torch.equal(got[k], want[k]), k
    unequalised = plain.sample(meta, mask, np.random.default_rng(0))["global_crops"]
    assert not torch.equal(unequalised, equalised.sample(meta, mask, np.random.default_rng(0))[
        "global_crops"])


def test_collate_and_masking(archive, tmp_path):
    ds = data.PretrainStream(archive, cache_dir=tmp_path, global_size=56, local_size=28, n_local=3,
                             adjacent_k=1, tissue_aware=True)
    items = [i for i, _ in zip(ds, range(4))]
    random.seed(0)
    out = data.collate_pretrain(items, patch_size=14)
    assert out["global"].shape == (8, 3, 56, 56) and out["local"].shape == (12, 3, 28, 28)
    # crop-major: [crop1 of all B; crop2 of all B]
    assert torch.equal(out["global"][5], items[1]["global_crops"][1])
    assert torch.equal(out["local"][4 * 2 + 3], items[3]["local_crops"][2])
    assert torch.equal(out["adjacent"][4], items[0]["adjacent"][1])
    masks, N = out["masks"], 16
    per_image = masks.sum(1)
    # half the crops masked, at most 50 %
    assert (per_image > 0).sum() == 4 and per_image.max() <= 0.5 * N
    assert out["n_masked"] == len(out["mask_indices"]) == masks.sum()
    per_image_weight = torch.zeros(8).index_add_(0, out["mask_indices"] // N, out["masks_weight"])
    torch.testing.assert_close(per_image_weight, (per_image > 0).float())  # 1 per masked image
    tissue = torch.zeros(64, 100)
    tissue[:, :30] = 1
    picked = data.tissue_masks(tissue, [20] * 64)
    # tissue preferred over background
    assert picked.sum() == 64 * 20 and picked[:, :30].float().mean() > 0.5


def test_masking_generator_counts():
    random.seed(0)
    gen = data.MaskingGenerator((16, 16), max_num_patches=0.5 * 224 // 14 * 224 // 14)
    for n in (10, 50, 100):
        m = gen(n)
        assert m.shape == (16, 16) and n * 0.6 <= m.sum() <= n


def test_synth_archive_and_cli(tmp_path, archive):
    with open(archive / "boxes.csv") as fh:
        header = next(csv.reader(fh))
    assert header == ["PatientID", "StudyUID", "View", "Subject", "Slice", "X", "Y", "Width",
                      "Height", "Class", "AD", "VolumeSlices"]
    rows = list(csv.DictReader(open(archive / "file-paths.csv")))
    assert len(rows) == 8 and {r["View"] for r in rows} == {"lcc", "rcc", "lmlo", "rmlo"}
    for r in rows:  # every file opens with plain pydicom
        ds = pydicom.dcmread(archive / r["classic_path"])
        assert ds.pixel_array.shape == (12, 96, 72) and ds.SOPClassUID == dicom.BTO
    for b in csv.DictReader(open(archive / "boxes.csv")):
        assert 0 <= int(b["X"]) and int(b["X"]) + int(b["Width"]) <= 72
        assert 0 <= int(b["Slice"]) < 12
    d = data.density_eval_set(archive, size=32)
    assert d["images"].shape == (8, 3, 32, 32) and d["groups"].tolist() == [0] * 4 + [1] * 4
    held_out = data.density_eval_set(archive, size=32, exclude={"SYN-P00000"})
    assert torch.equal(held_out["images"], d["images"][4:])
    assert held_out["groups"].tolist() == [0] * 4
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(Path(data.__file__).parent))
    subprocess.run([sys.executable, phantoms.__file__, "--out", str(out), "--patients", "1",
                    "--slices", "4", "--height", "32", "--width", "24"],
                   check=True, env=env, capture_output=True)
    assert len(list(out.rglob("*.dcm"))) == 4 and (out / "exams.csv").exists()
    assert phantoms.get_args([]).patients == 8


def test_detection_archive_adds_masses_and_leaves_the_rest(tmp_path):
    """lesion_rate draws its masses from a stream of its own: the base archive's exams, files and
    lesions stay."""
    base = phantoms.write_archive(tmp_path / "base", patients=3, seed=4, shape=(4, 64, 48))
    rich = phantoms.write_archive(tmp_path / "rich", patients=3, seed=4, shape=(4, 64, 48),
                                  lesion_rate=2.0)
    read = lambda root, name: list(csv.DictReader(open(root / name)))
    for name in ("exams.csv", "file-paths.csv"):
        assert read(base, name) == read(rich, name)
    base_boxes, rich_boxes = read(base, "boxes.csv"), read(rich, "boxes.csv")
    assert all(b in rich_boxes for b in base_boxes)  # the same lesions at the same places
    extra = [b for b in rich_boxes if b not in base_boxes]
    assert 10 <= len(extra) <= 40  # Poisson(2) over 12 views: mean 24, sd 4.9
    assert {b["Class"] for b in extra} == {"benign", "cancer"}
    # not cut by an edge
    whole = [b for b in extra if 0 < int(b["X"]) and int(b["X"]) + int(b["Width"]) < 48]
    # round masses, not calcifications
    assert len(whole) >= 5 and all(b["Width"] == b["Height"] for b in whole)
    # BCS-DBT's groups are exclusive: a volume with a cancer box is Cancer
    for r in read(rich, "labels.csv"):
        classes = {b["Class"] for b in rich_boxes
                   if (b["PatientID"], b["View"]) == (r["PatientID"], r["View"])}
        group = "Cancer" if "cancer" in classes else "Benign" if classes else "Normal"
        assert [k for k in ("Normal", "Benign", "Cancer") if r[k] == "1"] == [group]


def test_bcs_dbt_side_uses_stored_pixels(tmp_path):
    """A window that clips the left edge's few bright pixels flips the displayed sums but not the
    stored ones: the official reader (stored sums) keeps an 'lcc' image as it is, so ours must
    too."""
    stored = np.zeros((1, 32, 32), np.uint16)
    stored[0, :4, 0] = 1000  # left column sum 4000
    stored[0, :, -1] = 100  # right column sum 3200
    path = tmp_path / "clip.dcm"
    phantoms.write_bto(path, stored, bits_stored=10)
    ds = pydicom.dcmread(path)
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    voi.WindowCenter, voi.WindowWidth = 100, 200  # displayed: left 4 x 1.0 < right 32 x 0.5
    ds.save_as(path)
    vol, meta = dicom.read_dbt(path, view="lcc")
    # displayed sums alone would rotate it
    assert dicom.edge_side(vol[0]) == "R" and meta["rotated"] is False
    vol, meta = dicom.read_dbt(path, view="rcc")
    # rotated 180 degrees: the bright pixels move
    assert meta["rotated"] is True and vol[0, -1, -1] == 1.0


def test_masking_matches_dinov2_reference():
    """Same python `random` seed -> the same block masks and batch collation as dinov2.data (its
    masking.py and collate.py)."""
    import dinov2.data.masking as masking  # oracle: required, never skipped
    import dinov2.data.collate as collate  # oracle: required, never skipped
    for G in (8, 16, 37):
        ours = data.MaskingGenerator((G, G), max_num_patches=0.5 * G * G)
        ref = masking.MaskingGenerator(input_size=(G, G), max_num_patches=0.5 * G * G)
        for n in (4, 10, 30, G * G // 2):
            random.seed(n + G)
            a = ours(n)
            random.seed(n + G)
            assert np.array_equal(a, ref(n)), (G, n)
    g = torch.Generator().manual_seed(0)
    samples = [{"global_crops": torch.rand(2, 3, 112, 112, generator=g),
                "local_crops": torch.rand(8, 3, 56, 56, generator=g)} for _ in range(4)]
    random.seed(3)
    ours = data.collate_pretrain(samples)
    random.seed(3)
    gen = masking.MaskingGenerator(input_size=(8, 8), max_num_patches=0.5 * 112 // 14 * 112 // 14)
    batch = [({"global_crops": list(s["global_crops"]), "local_crops": list(s["local_crops"])}, 0)
             for s in samples]
    ref = collate.collate_data_and_cast(batch, (0.1, 0.5), 0.5, torch.float32, n_tokens=64,
                                        mask_generator=gen)
    assert torch.equal(ours["global"], ref["collated_global_crops"])
    assert torch.equal(ours["local"], ref["collated_local_crops"])
    assert torch.equal(ours["masks"], ref["collated_masks"])
    assert torch.equal(ours["mask_indices"], ref["mask_indices_list"])
    assert torch.allclose(ours["masks_weight"], ref["masks_weight"])


def test_separable_blur_equals_torchvision():
    import torchvision.transforms.functional as tvf  # oracle: required, never skipped
    x = torch.rand(1, 57, 40, generator=torch.Generator().manual_seed(0))
    for sigma in (0.1, 0.7, 2.0):
        want = tvf.gaussian_blur(x, 9, sigma)
        assert torch.allclose(data.gaussian_blur(x, sigma), want, atol=1e-6)


def test_scan_refuses_an_empty_source_and_reads_a_spreadsheet_manifest(tmp_path, volumes):
    """--data "" (an unset variable) once trained on the current folder; a manifest saved by a
    spreadsheet (BOM, CRLF) once lost its `path` column to the byte-order mark."""
    with pytest.raises(ValueError, match="--data is empty"):
        dicom.scan("")
    paths, _ = volumes
    bom_crlf = b"\xef\xbb\xbfpath,note\r\n" + str(paths["native"]).encode() + b",x\r\n"
    (tmp_path / "m.csv").write_bytes(bom_crlf)
    assert dicom.scan(tmp_path / "m.csv") == [str(paths["native"])]
    (tmp_path / "bin.csv").write_bytes(b"\x87\x00\xff" * 10)
    with pytest.raises(ValueError, match="bin.csv: not a readable CSV"):
        dicom.scan(tmp_path / "bin.csv")


def test_seeds_past_32_bits_are_hashed_not_refused_or_wrapped():
    """pretrain reseeds with seed + 65536 x step: past step 65,535 that exceeds numpy's 32-bit
    seeds."""
    utils.seed_everything(2**32 + 5)
    a = np.random.rand()
    utils.seed_everything(5)
    assert np.random.rand() != a  # not wrapped onto the seed of step 0
    utils.seed_everything(2**32 + 5)
    assert np.random.rand() == a


@pytest.mark.parametrize("laterality,mono1", [("L", False), ("R", True)])
def test_breast_view_crops_the_breast_and_keeps_its_aspect(tmp_path, laterality, mono1):
    """A 2-D view: displayed, chest wall left, cut to the breast's box, resized to fit keeping
    its aspect, top-left on black; a right breast stored MONOCHROME1 gives the left one's input."""
    img = np.zeros((80, 60), np.float32)  # (H, W) a 40 x 30 breast against the chest wall
    img[10:50, :30] = np.linspace(0.9, 0.4, 30)[None, :]  # brighter at the chest wall
    img[20:30, 5:15] = 1.0
    vol = img[None, :, ::-1] if laterality == "R" else img[None]  # (1, H, W) as displayed
    path = tmp_path / "view.dcm"
    phantoms.write_bto(path, phantoms.quantize(vol, 10, mono1), laterality, "CC",
                       monochrome1=mono1)
    out = data.breast_view(path, size=32)  # (3, 32, 32)
    shown = np.round(img * 1023) / 1023  # the stored levels, displayed
    want = F.interpolate(torch.from_numpy(shown[10:50, :30])[None, None], size=(32, 24),
                         mode="bilinear", antialias=True)[0, 0]  # 40 x 30 -> 32 x 24
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[2])
    assert (out[0] - F.pad(want, (0, 8))).abs().max() < 1e-5  # the rest of the frame black
    jpeg = tmp_path / "view.png"  # CDD-CESM's images are JPEG: Pillow's grey levels, same rule
    Image.fromarray(np.round(vol[0] * 255).astype(np.uint8)).save(jpeg)
    want = F.interpolate(torch.from_numpy(np.round(img[10:50, :30] * 255) / 255)[None, None],
                         size=(32, 24), mode="bilinear", antialias=True)[0, 0]
    assert (data.breast_view(jpeg, size=32)[0] - F.pad(want, (0, 8))).abs().max() < 1e-5
