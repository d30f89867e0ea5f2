"""dicom.decode_slice(reduce=r) and read_reduced: JPEG 2000 frames decoded r wavelet levels down
(Pillow's OpenJPEG reduce), against pydicom's full decode: the integer mapping, the agreement with
an area mean, the fallbacks and the errors. CPU, offline, a few seconds."""
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels import pixel_array

import dicom
import phantoms

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# pydicom's greyscale JPEG 2000 files: signed 16-bit, 13-bit unsigned codestream in a signed
# dataset, lossy (.91) signed 16-bit with BitsStored 14
SHIPPED = ["MR_small_jp2klossless.dcm", "JPEG2000.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm"]
SIZES = [(2, 512, 384), (2, 513, 389)]  # even; odd and 1 mod 4, where Pillow's rounding fails


def area_mean(x, f):
    """x (H, W) -> float64 (ceil(H / f), ceil(W / f)): the mean over the f x f square centred on
    pixel (f i, f j), where JPEG 2000's LL band samples, clipped to the image. A pixel half inside
    the square (f even) weighs 1/2; the first and the last row and column of squares (a partial
    one when f does not divide H or W) average the part inside the image."""
    def weights(n):  # (m, n): square i's overlap with pixel k, rows normalised
        centre = np.arange(-(-n // f))[:, None] * f  # (m, 1)
        k = np.arange(n)  # (n,)
        lo, hi = np.maximum(centre - f / 2, -0.5), np.minimum(centre + f / 2, n - 0.5)
        w = np.clip(np.minimum(hi, k + 0.5) - np.maximum(lo, k - 0.5), 0, None)
        return w / w.sum(1, keepdims=True)
    return weights(x.shape[0]) @ x.astype(np.float64) @ weights(x.shape[1]).T


def recode(src, dst, sample, precision, signed, intercept=0, **attrs):
    """A copy of the JPEG 2000 phantom src whose frames store sample(v) (v its stored frame) as
    `precision`-bit lossless codestreams, signed or not. Pillow encodes only unsigned 8 or 16
    bits, level-shifted by 2**(bits - 1): it encodes the sample plus that shift less the
    decoder's own (2**(precision - 1), unsigned only), then the SIZ component byte is rewritten
    (bit 7 signed, precision - 1)."""
    ds = pydicom.dcmread(src)
    bits = 8 if precision <= 8 else 16
    frames = []
    for v in ds.pixel_array.astype(np.int64):  # (H, W) each
        coded = sample(v) + 2 ** (bits - 1) - (0 if signed else 2 ** (precision - 1))
        buf = io.BytesIO()
        Image.fromarray(coded.astype(f"u{bits // 8}")).save(buf, "JPEG2000", irreversible=False,
                                                             no_jp2=True)
        codestream = bytearray(buf.getvalue())
        codestream[42] = 0x80 * signed | (precision - 1)  # Ssiz after SOC, SIZ, 38 bytes
        frames.append(bytes(codestream))
    ds.PixelData = encapsulate(frames)
    ds.update(attrs)
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PixelValueTransformationSequence[0].RescaleIntercept = intercept
    ds.save_as(dst)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """JPEG 2000 phantoms of SIZES, one native, and re-encodings of the odd one: signed 12-bit
    (stored v - 512, intercept 512: displays as the original), unsigned 12-bit, signed 8-bit."""
    root = tmp_path_factory.mktemp("reduce")
    out = {shape: phantoms.write_phantom_dicom(root / f"{shape[1]}.dcm", shape, "j2k", seed=4)
           for shape in SIZES}
    out["native"] = phantoms.write_phantom_dicom(root / "native.dcm", SIZES[1], seed=4)
    src = out[SIZES[1]]
    out["s12"] = recode(src, root / "s12.dcm", lambda v: v - 512, 12, True, intercept=512,
                        PixelRepresentation=1, BitsStored=12, HighBit=11)
    out["u12"] = recode(src, root / "u12.dcm", lambda v: v, 12, False, BitsStored=12, HighBit=11)
    out["s8"] = recode(src, root / "s8.dcm", lambda v: (v >> 2) - 128, 8, True,
                       PixelRepresentation=1, BitsAllocated=8, BitsStored=8, HighBit=7)
    return out


@pytest.mark.parametrize("shape", SIZES)
def test_reduced_agrees_with_area_mean(files, shape):
    """Acceptance: reduce 1 and 2 (factors 2, 4) display within 1/256 mean absolute difference of
    the full frame's area mean (area_mean: squares centred where the LL band samples)."""
    meta = dicom.parse_headers(files[shape])
    for s in range(shape[0]):
        full, factor = dicom.read_reduced(meta, s)
        assert factor == 1
        for r in (1, 2):
            reduced, factor = dicom.read_reduced(meta, s, r)
            assert factor == 2 ** r and reduced.dtype == np.float32
            assert reduced.shape == (-(-shape[1] // factor), -(-shape[2] // factor))
            mad = np.abs(reduced - area_mean(full, factor)).mean()
            assert mad < 1 / 256, (shape, s, factor, mad)


@pytest.mark.parametrize("name", ["phantom", "s12", "u12", "s8"] + SHIPPED)
def test_pillow_mapping_is_pydicoms(files, name):
    """At reduce 0 the Pillow path gives pydicom's stored integers and dtype exactly: unsigned and
    signed codestreams, 8-, 12-, 13-, 16-bit, a signedness mismatch, lossy JPEG 2000."""
    path = files[SIZES[1]] if name == "phantom" else files.get(name, TEST_FILES / name)
    meta = dicom.parse_headers(path)
    for s in range(meta["n_frames"]):
        ours = dicom._j2k_reduced(meta, s, 0)
        ref, factor = dicom.decode_slice(meta, s)
        assert ours is not None and factor == 1
        assert ours.dtype == ref.dtype and ours.dtype.isnative
        np.testing.assert_array_equal(ours, ref)


def test_signed_and_12_bit_reduce_like_the_original(files):
    """The 5/3 wavelet commutes with integer offsets: the signed copy (stored v - 512) displays,
    reduced, exactly as the unsigned original; the unsigned 12-bit copy stores the same values."""
    metas = {k: dicom.parse_headers(files[k]) for k in (SIZES[1], "s12", "u12")}
    assert metas["s12"]["signed"] == 1
    for s in range(SIZES[1][0]):
        for r in (0, 1, 2):
            want, factor = dicom.read_reduced(metas[SIZES[1]], s, r)
            got, got_factor = dicom.read_reduced(metas["s12"], s, r)
            assert got_factor == factor == 2 ** r
            np.testing.assert_array_equal(got, want)
            stored, _ = dicom.decode_slice(metas["s12"], s, r)
            assert stored.dtype == np.int16 and stored.min() < 0
            np.testing.assert_array_equal(dicom.decode_slice(metas["u12"], s, r)[0],
                                          dicom.decode_slice(metas[SIZES[1]], s, r)[0])


def test_native_and_too_large_reduce_fall_back(files):
    """Native frames, reduce beyond the codestream's decomposition levels, and a signed dataset
    whose codestream says unsigned (the wavelet saw wrapped values) decode in full, factor 1."""
    meta = dicom.parse_headers(files["native"])
    for s in range(meta["n_frames"]):
        stored, factor = dicom.decode_slice(meta, s, 2)
        assert factor == 1
        np.testing.assert_array_equal(stored, pixel_array(files["native"], index=s))
        assert dicom.read_reduced(meta, s, 2)[1] == 1
    meta = dicom.parse_headers(files[SIZES[1]])
    levels = dicom._j2k_levels(dicom._j2k_frame(files[SIZES[1]], 1))
    assert levels == 5  # Pillow's default: 6 resolutions
    stored, factor = dicom.decode_slice(meta, 1, levels)
    assert factor == 32 and stored.shape == (17, 13)
    stored, factor = dicom.decode_slice(meta, 1, levels + 1)
    assert factor == 1
    np.testing.assert_array_equal(stored, pixel_array(files[SIZES[1]], index=1))
    mismatch = dicom.parse_headers(TEST_FILES / "J2K_pixelrep_mismatch.dcm")
    stored, factor = dicom.decode_slice(mismatch, 0, 1)
    assert factor == 1 and stored.shape == (512, 512)
    with pytest.raises(ValueError, match="reduce must be >= 0"):
        dicom.decode_slice(meta, 0, -1)


def test_offset_tables_and_one_frames_bytes(files, tmp_path):
    """The frame's codestream comes from the Basic Offset Table, the Extended one, or neither
    (one fragment per frame), and it is that frame's, not another's."""
    src = files[SIZES[1]]
    ds = pydicom.dcmread(src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=2))
    assert frames[0] != frames[1]
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = (
        encapsulate_extended(frames))
    ds.save_as(tmp_path / "eot.dcm")
    del ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths
    ds.PixelData = encapsulate(frames, has_bot=False)
    ds.save_as(tmp_path / "none.dcm")
    want = [dicom.decode_slice(dicom.parse_headers(src), s, 1)[0] for s in range(2)]
    for path in (src, tmp_path / "eot.dcm", tmp_path / "none.dcm"):
        meta = dicom.parse_headers(path)
        for s in range(2):
            assert dicom._j2k_frame(path, s) == frames[s]
            np.testing.assert_array_equal(dicom.decode_slice(meta, s, 1)[0], want[s])


def test_corrupt_codestream_names_file_and_frame(files, tmp_path):
    src = files[SIZES[1]]
    ds = pydicom.dcmread(src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=2))
    body = frames[1].find(b"\xff\x90") + 14  # past the main header and the first SOT segment
    noise = np.random.default_rng(0).integers(0, 256, len(frames[1]) - body, dtype=np.uint8)
    ds.PixelData = encapsulate([frames[0], frames[1][:body] + noise.tobytes()])
    ds.save_as(tmp_path / "bad.dcm")
    meta = dicom.parse_headers(tmp_path / "bad.dcm")
    assert dicom.decode_slice(meta, 0, 1)[1] == 2  # the intact frame still reduces
    for r in (0, 1, 2):
        with pytest.raises(ValueError, match=r"bad\.dcm: cannot decode frame 1 \(JPEG 2000"):
            dicom.decode_slice(meta, 1, r)
