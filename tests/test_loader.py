"""The loader's fast paths (issue 23) against their references: uncompressed frames read from the
file (dicom._read_native) against pydicom.pixels, byte order and unused bits included; read_slice's
reused arrays; CLAHE from stored integers (preprocess.clahe_stored) against clahe of the displayed
slice."""
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import pixel_array

import data
import dicom
import phantoms
import preprocess

TEST_FILES = Path(pydicom.data.get_testdata_file("MR_small.dcm")).parent


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_padded.dcm",
                                  "CT_small.dcm"])
def test_native_frames_are_pydicoms(name):
    """pydicom's own uncompressed files (signed 16-bit; implicit VR, big endian, padded): read
    here, as pydicom.pixels decodes them, values and native-order dtype."""
    meta = dicom.parse_headers(TEST_FILES / name)
    assert meta["native"] is not None, "the fast path must serve every uncompressed file here"
    ours, _ = dicom.decode_slice(meta, 0)
    want = pixel_array(TEST_FILES / name)
    assert ours.dtype == want.dtype.newbyteorder("=") and np.array_equal(ours, want)


def _garbled(tmp_path, signed):
    """A 3-frame 12-bit file whose unused top 4 bits hold garbage (pydicom.pixels clears them, or
    fills them with the sign): -> (path, the raw 16-bit words)."""
    rng = np.random.default_rng(1)
    lo, hi = (-2048, 2048) if signed else (0, 4096)
    values = rng.integers(lo, hi, (3, 40, 30))
    raw = (values & 0x0FFF) | (rng.integers(0, 16, values.shape) << 12)  # junk above bit 11
    stored = np.zeros((3, 40, 30), np.uint16)
    path = tmp_path / f"g{signed}.dcm"
    phantoms.write_bto(path, stored, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = int(signed)
    ds.PixelData = raw.astype("<u2").tobytes()
    ds.save_as(path)
    return path, raw


@pytest.mark.parametrize("signed", [False, True])
def test_unused_bits_are_cleared_or_sign_filled(tmp_path, signed):
    path, raw = _garbled(tmp_path, signed)
    assert (raw >> 12).any(), "the file must carry junk in its unused bits"
    meta = dicom.parse_headers(path)
    assert meta["native"] is not None
    for s in range(3):
        ours, _ = dicom.decode_slice(meta, s)
        want = pixel_array(path, index=s)
        assert ours.dtype == want.dtype and np.array_equal(ours, want), s
    # and into a caller's array (VolumeReader's shared memory): the same values, that array
    out = np.full((40, 30), 7, ours.dtype)
    assert dicom.decode_slice(meta, 2, out=out)[0] is out and np.array_equal(out, want)


def test_legacy_series_and_cut_short_files(tmp_path):
    """One file per slice: each file's own offset. A file cut after its header was read is one
    line naming it, not a short array."""
    series = tmp_path / "series"
    series.mkdir()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 1024, (3, 64, 48)).astype(np.uint16)
    for z, f in enumerate(frames):
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 64, 48, 10, 9, 0
        ds.ImagePositionPatient, ds.PixelData = [0, 0, float(z)], f.astype("<u2").tobytes()
        ds.save_as(series / f"{2 - z}.dcm")  # names in reverse z order
    meta = dicom.parse_headers(series)
    assert len(set(meta["native"])) == 1  # the same header size, so one offset each
    for z in range(3):
        assert np.array_equal(dicom.decode_slice(meta, z)[0], frames[z]), z
    last = Path(meta["frames"][2][0])
    last.write_bytes(last.read_bytes()[:meta["native"][2] + 1000])  # into the frame
    cut = rf"{last.name}: cannot decode frame 2: the file is cut short"
    with pytest.raises(ValueError, match=cut):
        dicom.decode_slice(meta, 2)


def test_read_slice_scratch_reuses_its_arrays(tmp_path):
    """With a scratch dict the decode and the VOI write the same arrays each call, and the slice is
    the one read without it."""
    path = phantoms.write_phantom_dicom(tmp_path / "v.dcm", (4, 64, 48), "native", seed=2)
    meta, _ = data.volume_index(path, tmp_path / "c")
    scratch = {}
    first = data.read_slice(meta, 0, scratch)
    pointer = first.data_ptr()
    for s in (1, 3):
        again = data.read_slice(meta, s, scratch)
        assert again.data_ptr() == pointer
        assert torch.equal(again, data.read_slice(meta, s)), s
    assert scratch["stored"].dtype == np.uint16 and scratch["shown"].dtype == np.float32


def test_clahe_from_stored_integers_is_clahe_of_the_displayed_slice(archive, tmp_path):
    """read_clahe (bins looked up from stored integers) is clahe(read_slice) bit for bit for every
    VOI function, MONOCHROME1 and mirrored volume of the archive."""
    kinds = set()
    for path in sorted(archive.rglob("*.dcm"))[:8]:
        meta, _ = data.volume_index(path, tmp_path)
        for s in (0, meta["n_frames"] // 2):
            want = torch.from_numpy(preprocess.clahe(data.read_slice(meta, s).numpy()))
            assert torch.equal(data.read_clahe(meta, s, {}), want), (path, s)
        kinds.add((meta["voi"][0][4], meta["invert"], meta["flip"]))
    assert {k[0] for k in kinds} == {"LINEAR", "SIGMOID", "LINEAR_EXACT"}, kinds
    assert {k[1] for k in kinds} == {k[2] for k in kinds} == {False, True}, kinds
    with pytest.raises(ValueError, match="clahe_stored: expected"):
        preprocess.clahe_stored(np.zeros((4, 4), np.float32), lambda v: v)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "arch"
    return phantoms.synthetic_archive(root, patients=2, seed=0, shape=(12, 96, 72))


def test_volume_reader_maps_clean_uncompressed_volumes(tmp_path):
    """A native little-endian volume is handed over as its file's mapped bytes (no shared-memory
    copy), through a worker too; junk in the unused bits, or mapped=False, decodes it instead.
    Every way gives pydicom's values. Where the tensor's bytes live: /proc/self/maps."""
    clean = phantoms.write_phantom_dicom(tmp_path / "clean.dcm", (5, 64, 48), "native", seed=4)
    junk, _ = _garbled(tmp_path, signed=False)
    for path in (clean, junk):
        want = np.stack([pixel_array(path, index=s) for s in range(dicom.index_volume(path)[
            "n_frames"])])
        for workers, mapped in ((0, True), (1, True), (1, False)):
            reader = data.VolumeReader([path], mapped=mapped)
            loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers)
            (_, item), = list(loader)
            stored = item["stored"]
            assert np.array_equal(stored.numpy(), want), (path.name, workers, mapped)
            where = _mapped_file(stored.data_ptr())
            assert (where == str(path)) == (mapped and path == clean), (path.name, workers, where)


def _mapped_file(address):
    """The file mapped at `address` in this process (from /proc/self/maps), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= address < hi:
            return rest[4] if len(rest) == 5 else None
    return None


def test_a_file_rewritten_since_indexing_is_read_afresh(tmp_path):
    """The index's offset no longer points at Pixel Data once a slice file's header grew: the frame
    is then decoded by pydicom, not read from the stale offset."""
    series = tmp_path / "series"
    series.mkdir()
    frames = np.random.default_rng(2).integers(0, 1024, (2, 64, 48)).astype(np.uint16)
    for z, f in enumerate(frames):
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 64, 48, 10, 9, 0
        ds.ImagePositionPatient, ds.PixelData = [0, 0, float(z)], f.astype("<u2").tobytes()
        ds.save_as(series / f"{z}.dcm")
    meta = dicom.parse_headers(series)
    ds = pydicom.dcmread(series / "0.dcm")
    ds.ImageComments = "re-exported " * 20  # a longer header: Pixel Data moves
    ds.PixelData = frames[1].astype("<u2").tobytes()
    ds.save_as(series / "0.dcm")
    assert np.array_equal(dicom.decode_slice(meta, 0)[0], frames[1])


def test_headers_without_rows_and_32_bit_clahe(tmp_path):
    """A header with Pixel Data but no Rows is still one line ("no image"); 32-bit data (too many
    values for clahe_stored's table) is equalised as clahe(read_slice) all the same."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    del ds.Rows
    ds.save_as(tmp_path / "norows.dcm")
    with pytest.raises(ValueError, match=r"norows\.dcm: no image"):
        dicom.parse_headers(tmp_path / "norows.dcm")
    meta = dicom.index_volume(TEST_FILES / "rtdose.dcm")  # 32-bit, 15 frames of 10 x 10
    want = torch.from_numpy(preprocess.clahe(data.read_slice(meta, 3).numpy()))
    assert meta["native"] is None and torch.equal(data.read_clahe(meta, 3), want)
