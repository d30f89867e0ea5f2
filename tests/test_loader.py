"""The loader's fast paths (issue 23) against their references: uncompressed frames read from the
file (dicom._read_native) against pydicom.pixels, byte order and unused bits included; read_slice's
reused arrays; CLAHE from stored integers (preprocess.clahe_stored) against clahe of the displayed
slice; the crop pyramid (data.Pyramid) and JPEG 2000 read at the level it asks for (read_level)
against the direct resize of the full slice."""
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
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


def direct(image, box, size):
    """The direct resize of box (top, left, h, w) of image (H, W): (size, size)."""
    t, l, h, w = box
    return F.interpolate(image[None, None, t:t + h, l:l + w], size=(size, size), mode="bicubic",
                         align_corners=False, antialias=True)[0, 0]


def test_reduced_jpeg2000_levels_sit_where_their_samples_are(tmp_path):
    """read_level decodes a JPEG 2000 slice 1 and 2 wavelet levels down, with the shift of its
    samples (each centred on every 2**r-th pixel, not between two; mirrored with the slice). On a
    linear ramp, which both the wavelet and the bicubic kernel keep, a crop resampled from it with
    that shift is the direct resize of the full slice to rounding (5e-4); ignoring the shift
    moves it by 0.5 (level 1) and 1.5 (level 2) pixels: 0.001-0.006 here. Each orientation: a
    slice read as stored and one mirrored."""
    rows, cols = np.mgrid[0:256, 0:192]
    flips = set()
    for mirrored in (False, True):
        # (256, 192): 0..956, 10 bits; unequal slopes, so row and column shifts cannot cancel
        ramp = 3 * rows + (191 - cols if mirrored else cols)
        path = tmp_path / f"ramp{int(mirrored)}.dcm"
        phantoms.write_bto(path, np.stack([ramp, ramp]).astype(np.uint16), encoding="j2k")
        meta, _ = data.volume_index(path, tmp_path / "idx")
        flips.add(meta["flip"])
        box, inner = (37, 29, 170, 130), (slice(3, -3),) * 2  # away from the box's cut edges
        want = direct(data.read_slice(meta, 1), box, 24)
        for level in (1, 2):
            image, factor, shift = data.read_level(meta, 1, level)
            assert factor == 2 ** level and image.shape == (256 // factor, 192 // factor)
            got = data._resample(image, box, 24, level, False, shift)
            assert (got - want)[inner].abs().max() < 5e-4, (mirrored, level)
            unshifted = data._resample(image, box, 24, level, False, (0.0, 0.0))
            assert (unshifted - want)[inner].abs().max() > 8e-4, (mirrored, level)
    assert flips == {False, True}


def test_pyramid_reads_once_at_the_first_level_asked_for():
    """A Pyramid reads the slice at the level its first crop asks for, makes coarser levels as 2x2
    means of it (keeping its shift), and reads again only for a finer level."""
    calls = []

    def read(level):
        calls.append(level)
        marked = torch.full((64 >> level, 48 >> level), float(level))  # which read made it
        return marked, 2 ** level, (0.5 - 2 ** level / 2, 0.25)

    pyramid = data.Pyramid((64, 48), read)
    assert pyramid[2].shape == (16, 12) and calls == [2]
    assert torch.equal(pyramid[3], data._half(pyramid[2])) and calls == [2]
    assert pyramid.shifts[3] == pyramid.shifts[2] == (-1.5, 0.25)
    assert torch.equal(pyramid[1], torch.full((32, 24), 1.0)) and calls == [2, 1]
    assert torch.equal(pyramid[2], torch.full((16, 12), 2.0))  # the read, not a mean of level 1
    assert pyramid[0].shape == (64, 48) and calls == [2, 1, 0]
    image = torch.rand(8, 6)
    assert data.Pyramid.of(image)[0] is image
    assert torch.equal(data.Pyramid.of(image)[1], data._half(image))


def test_a_jpeg2000_stream_decodes_each_slice_once_at_the_level_its_crops_need(tmp_path,
                                                                              monkeypatch):
    """At --mip-margin 1 every crop of these sizes comes from level 1 or coarser, so the stream
    decodes each JPEG 2000 slice once, reduced, never in full (a mirrored slice of odd width, whose
    reduction would not line up, is read in full); the draws are the direct path's and the crops
    are within mean 0.005 of its resize of the full slice (a margin this low gives up the 0.03
    maximum: data.MultiCrop)."""
    volume, _ = phantoms.make_phantom((3, 280, 223), seed=1)
    stored = phantoms.quantize(volume)
    reads = []
    decode = dicom.decode_slice
    monkeypatch.setattr(dicom, "decode_slice", lambda meta, s, reduce=0, out=None: (
        reads.append(reduce), decode(meta, s, reduce, out))[1])
    for name, frames in (("even", stored[:, :, :222]), ("odd-mirrored", stored[:, :, ::-1])):
        folder = tmp_path / name
        folder.mkdir()
        phantoms.write_bto(folder / "v.dcm", np.ascontiguousarray(frames), encoding="j2k")
        crops = {}
        for pyramid in (True, False):
            stream = data.PretrainStream(folder, cache_dir=tmp_path / "idx", global_size=28,
                                         local_size=14, n_local=4, mip_margin=1.0,
                                         pyramid=pyramid, **data.RECIPES["dbt-dino"])
            meta, mask = data.volume_index(stream.paths[0], tmp_path / "idx")
            rng = np.random.default_rng(4)
            reads.clear()
            crops[pyramid] = [stream.sample(meta, mask, rng) for _ in range(6)]
            if pyramid:
                assert meta["flip"] == (name == "odd-mirrored"), name
                assert len(reads) == 6, (name, reads)  # one read per sample: slice s
                assert all(r == 0 for r in reads) if meta["flip"] else min(reads) >= 1, reads
        for ours, theirs in zip(crops[True], crops[False]):
            assert torch.equal(ours["global_tissue"], theirs["global_tissue"])
            for key in ("global_crops", "local_crops"):
                assert (ours[key] - theirs[key]).abs().mean() < 0.005, (name, key)


def test_full_size_crops_of_an_equalised_slice_stay_within_the_tolerance(tmp_path):
    """Issue 23's bounds on CLAHE (within 0.01 of scikit-image on a full-size phantom slice) and on
    the pyramid, where it is hardest: crops of CLAHE'd full-size slices
    (2457 x 1996, the phantom's 5-pixel steps sharpened), mammodino's sizes, before photometry.
    At the default margin every crop (some from level 1) is within mean 0.005, max 0.03 of the
    direct resize; at 2.5, this default until the issue's last changes, one goes beyond 0.03."""
    path = phantoms.write_phantom_dicom(tmp_path / "v.dcm", (2, 2457, 1996), "native", seed=2)
    meta, mask = data.volume_index(path, tmp_path / "idx")
    slices = [data.read_clahe(meta, s) for s in range(2)]
    from skimage.exposure import equalize_adapthist  # and CLAHE itself, on a full-size slice
    want = equalize_adapthist(data.read_slice(meta, 0).numpy())
    assert np.abs(slices[0].numpy() - want).max() <= 0.01  # 6e-5 measured
    worst = {}
    for margin in (data.MultiCrop.MIP_MARGIN, 2.5):
        made = {}
        for pyramid in (True, False):
            multicrop = data.MultiCrop(global_size=224, local_size=98, pyramid=pyramid,
                                       mip_margin=margin, **data.RECIPES["mammodino"])
            made[pyramid], crop = [], multicrop._crop

            def spy(levels, box, flip, size, crop=crop, multicrop=multicrop, out=made[pyramid]):
                out.append((multicrop._level(box, size), crop(levels, box, flip, size)))
                return out[-1][1]

            multicrop._crop, rng = spy, np.random.default_rng(1)
            for k in range(12):
                multicrop(slices[k % 2], mask, meta["mask_stride"], rng, k % 2, 2,
                          lambda s: slices[s])
        diffs = [(level, (x - want).abs()) for (level, x), (_, want) in zip(*made.values())]
        assert any(level for level, _ in diffs), margin  # the pyramid served some crops
        assert all(d.mean() <= 0.005 for _, d in diffs), margin
        worst[margin] = max(float(d.max()) for _, d in diffs)
    assert worst[data.MultiCrop.MIP_MARGIN] <= 0.03 < worst[2.5], worst
