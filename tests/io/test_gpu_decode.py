"""GPU decoding of compressed DICOM (``io.gpu_decode``): registered only when it decodes exactly
what the CPU decodes; without nvImageCodec, without a GPU, or when it decodes wrongly, the CPU
plugins decode and the pixels are the same.

nvImageCodec needs an NVIDIA GPU, so here a stand-in plugin module takes its place, registered
the way nvImageCodec's ``pydicom_plugin.register()`` does it (first in pydicom's plugin order)."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from pydicom.pixels.decoders import JPEG2000Decoder, JPEG2000LosslessDecoder, JPEGBaseline8BitDecoder

from lung_effnet.io.dicom_index import index_dicom_tree
from lung_effnet.io.dicom_series import load_series
from lung_effnet.io.gpu_decode import enable_gpu_decode
from lung_effnet.io.ledger import Ledger
from lung_effnet.synthetic.dicom_writer import write_dicom_series
from lung_effnet.synthetic.phantom import make_phantom

STANDIN = '''
from pydicom.pixels.decoders import JPEG2000Decoder, JPEG2000LosslessDecoder, JPEGBaseline8BitDecoder
from pydicom.pixels.decoders import pylibjpeg

NVIMGCODEC_PLUGIN_LABEL = "0.0+standin"  # sorts before pydicom's own plugins, as nvImageCodec's does
SUPPORTED_DECODER_CLASSES = [JPEG2000LosslessDecoder, JPEG2000Decoder, JPEGBaseline8BitDecoder]
DECODER_DEPENDENCIES = {d.UID: ("a GPU",) for d in SUPPORTED_DECODER_CLASSES}
MODE = "{mode}"
calls = []


def is_available(uid):
    return True


def _decode_frame(src, runner):
    calls.append(len(src))
    if MODE == "raises":
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    frame = bytearray(pylibjpeg._decode_frame(src, runner))
    if MODE == "wrong":
        frame[0] ^= 1  # one bit off in one pixel
    return frame


def register():
    for decoder in SUPPORTED_DECODER_CLASSES:
        decoder.add_plugin(NVIMGCODEC_PLUGIN_LABEL, (__name__, "_decode_frame"))
        decoder._available = dict(sorted(decoder._available.items()))
    return True


def unregister():
    for decoder in SUPPORTED_DECODER_CLASSES:
        if NVIMGCODEC_PLUGIN_LABEL in decoder.available_plugins:
            decoder.remove_plugin(NVIMGCODEC_PLUGIN_LABEL)
    return True
'''


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """``standin(mode)`` -> the importable name of a stand-in plugin that decodes right ("exact"),
    flips a bit ("wrong") or has no GPU ("raises"); unregistered after the test."""
    names = []

    def make(mode: str) -> str:
        name = f"standin_plugin_{mode}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(STANDIN.replace("{mode}", mode)))
        names.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for name in names:
        sys.modules[name].unregister()
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def j2k_series(tmp_path_factory):
    phantom = make_phantom("malignant", np.random.default_rng(2), size_px=96, n_slices=3)
    folder = tmp_path_factory.mktemp("j2k") / "series"
    write_dicom_series(phantom.hu, phantom.spacing, folder, patient_id="P", patient_name="P^P",
                       rng=np.random.default_rng(2), compression="jpeg2000")
    return folder, np.rint(phantom.hu).astype(np.int16)


def _decode(folder):
    (entry,) = index_dicom_tree(folder, Ledger(), progress=False).values()
    return load_series(entry, Ledger()).hu


def test_without_nvimgcodec_nothing_changes(j2k_series):
    folder, _ = j2k_series
    before = _decode(folder)
    enabled, why = enable_gpu_decode("nvidia_nvimgcodec_is_not_installed_here")
    assert not enabled and "not available" in why
    np.testing.assert_array_equal(_decode(folder), before)


def test_an_exact_plugin_decodes_first_and_gives_the_cpu_pixels(standin, j2k_series):
    folder, _ = j2k_series
    cpu = _decode(folder)
    name = standin("exact")
    enabled, why = enable_gpu_decode(name)
    assert enabled, why
    calls = sys.modules[name].calls
    n_before = len(calls)
    np.testing.assert_array_equal(_decode(folder), cpu)
    assert len(calls) == n_before + 3  # every slice went through the plugin


def test_lossy_and_jpeg_syntaxes_stay_on_the_cpu(standin):
    """Only the lossless JPEG 2000 family, which the test frame checks, is handed to the GPU: a lossy
    decode may round differently from the CPU decode training used."""
    assert enable_gpu_decode(standin("exact"))[0]
    assert "0.0+standin" in JPEG2000LosslessDecoder.available_plugins
    assert "0.0+standin" not in JPEG2000Decoder.available_plugins
    assert "0.0+standin" not in JPEGBaseline8BitDecoder.available_plugins


@pytest.mark.parametrize("mode", ["wrong", "raises"])
def test_a_plugin_that_is_wrong_or_has_no_gpu_is_removed(standin, j2k_series, mode):
    folder, _ = j2k_series
    cpu = _decode(folder)
    enabled, why = enable_gpu_decode(standin(mode))
    assert not enabled and ("differ" if mode == "wrong" else "failed") in why
    assert "0.0+standin" not in JPEG2000LosslessDecoder.available_plugins
    np.testing.assert_array_equal(_decode(folder), cpu)


def test_a_frame_the_plugin_fails_on_falls_back_to_the_cpu(standin, j2k_series):
    """Registered and checked, then the GPU goes away (or a frame it cannot take): pydicom tries
    the next plugin for that frame, so the series still decodes, pixel-equal."""
    folder, _ = j2k_series
    cpu = _decode(folder)
    name = standin("exact")
    assert enable_gpu_decode(name)[0]
    sys.modules[name].MODE = "raises"
    np.testing.assert_array_equal(_decode(folder), cpu)
