"""Lossless JPEG 2000 DICOM decoded on the GPU by NVIDIA nvImageCodec, with the CPU as fallback.

JPEG 2000 decodes ~50x slower than uncompressed pixel data on a CPU core (``benchmarks/RESULTS.md``):
in a JPEG 2000 archive decoding, not the model, sets the speed of scoring. nvImageCodec ships a
pydicom decoder plugin (``nvidia.nvimgcodec.tools.dicom.pydicom_plugin``, in the PyPI wheel
``nvidia-nvimgcodec-cu12`` / ``-cu13``) that pydicom tries before its own plugins once registered.

``enable_gpu_decode`` registers it (``score --device cuda`` does, in every decode worker) for the
lossless JPEG 2000 family only (``LOSSLESS_KEPT``) and then checks it: one JPEG 2000 lossless frame,
encoded here, must decode to the same pixels through the plugin as through pydicom's CPU plugins, or
the plugin is removed again. After that, pydicom's own fallback applies frame by frame: a frame
the plugin fails on is decoded by the next plugin (the CPU ones). Without the wheel, without a GPU, or when the check fails, nothing changes: the
CPU plugins decode, as they always do.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np

NVIMGCODEC_PLUGIN = "nvidia.nvimgcodec.tools.dicom.pydicom_plugin"
"""The module of nvImageCodec's pydicom plugin (``register()``, ``unregister()``, its label)."""
CHECK_SIDE = 64
"""Side, px, of the frame the plugin must decode exactly before it is trusted."""


def enable_gpu_decode(plugin_module: str = NVIMGCODEC_PLUGIN) -> tuple[bool, str]:
    """Register nvImageCodec's pydicom plugin and keep it only if it decodes a JPEG 2000 lossless
    frame pixel-equal to the CPU plugins.

    Args:
        plugin_module: the plugin's module (tests name a stand-in).

    Returns:
        ``(enabled, why)``: whether the plugin now decodes first, and in words why not.
    """
    try:
        plugin = importlib.import_module(plugin_module)
    except Exception as exc:  # not installed, or its CUDA libraries do not load
        return False, f"nvImageCodec not available ({type(exc).__name__}: {exc})"
    try:
        if not plugin.register():
            return False, "nvImageCodec refused to register with pydicom"
    except Exception as exc:
        return False, f"nvImageCodec did not register ({type(exc).__name__}: {exc})"
    label = plugin.NVIMGCODEC_PLUGIN_LABEL
    keep_lossless_only(plugin, label)
    try:
        gpu, cpu = check_frame(label)
        same = gpu.shape == cpu.shape and gpu.dtype == cpu.dtype and bool(np.array_equal(gpu, cpu))
        why = "" if same else "its pixels differ from the CPU decode"
    except Exception as exc:  # no GPU, no CUDA driver: the plugin raises on its first frame
        same, why = False, f"it failed on a test frame ({type(exc).__name__}: {exc})"
    if not same:
        plugin.unregister()
        return False, f"nvImageCodec not used: {why}"
    return True, "nvImageCodec (GPU) first, pydicom's CPU plugins as fallback"


LOSSLESS_KEPT = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202")
"""JPEG 2000 lossless and HTJ2K lossless (and RPCL): the codec family the test frame checks, whose
decode has one right answer. nvImageCodec also registers for JPEG (baseline, extended, lossless),
lossy JPEG 2000 and HTJ2K; lossy decoders may round differently from the CPU decoders that
training used (+-1), and JPEG is another codec than the one checked, so those stay on the CPU."""


def keep_lossless_only(plugin, label: str) -> None:
    """Remove ``label`` from every decoder the plugin registered with but ``LOSSLESS_KEPT``'s (its
    ``SUPPORTED_DECODER_CLASSES`` are pydicom's decoder instances)."""
    for decoder in getattr(plugin, "SUPPORTED_DECODER_CLASSES", []):
        if decoder.UID not in LOSSLESS_KEPT and label in decoder.available_plugins:
            decoder.remove_plugin(label)


def disable_gpu_decode(plugin_module: str = NVIMGCODEC_PLUGIN) -> None:
    """Undo ``enable_gpu_decode`` in this process (where it ran, or was inherited by ``fork``)."""
    plugin = sys.modules.get(plugin_module)
    if plugin is not None:
        plugin.unregister()


def check_frame(label: str) -> tuple[np.ndarray, np.ndarray]:
    """One ``CHECK_SIDE`` px int16 CT-like frame, JPEG 2000 lossless, decoded by the plugin
    ``label`` and by pydicom's CPU plugins: ``(plugin pixels, CPU pixels)``."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import JPEG2000Lossless

    dataset = _j2k_dataset()
    decoder = get_decoder(JPEG2000Lossless)
    cpu_plugins = [name for name in decoder.available_plugins if name != label]
    gpu = decoder.as_array(dataset, decoding_plugin=label)[0]
    cpu = decoder.as_array(dataset, decoding_plugin=cpu_plugins[0])[0]
    return gpu, cpu


def _j2k_dataset():
    """A CT Image dataset whose pixels span the int16 CT range (air, lung, soft tissue, bone),
    compressed JPEG 2000 lossless with pydicom's own encoder."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    rng = np.random.default_rng(0)
    pixels = rng.integers(-1024, 3072, (CHECK_SIDE, CHECK_SIDE)).astype(np.int16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.tobytes()
    ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
    return ds
