"""``fedscan predict`` on a DICOM series: NIfTI out on the series' grid, optionally a DICOM SEG.

The series is checked and read like an import (:mod:`fedscan.shared.dicom_io`), written to a
private temporary NIfTI, and segmented by the same :func:`predict_file` as any NIfTI input,
so both inputs get identical preprocessing. The temporary file is removed afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from fedscan.shared.checkpoint import load_model
from fedscan.shared.dicom_io import one_series, read_series
from fedscan.shared.dicom_seg import write_seg
from fedscan.shared.errors import FedscanError
from fedscan.shared.inference import predict_file


def class_names_of(model_path: str | Path) -> list[str]:
    """Foreground class names for SEG segments: the model config's, else ``class N``."""
    cfg, _, _ = load_model(model_path)
    names = list(getattr(cfg.data, "class_names", None) or [])[1:]
    return [names[i - 1] if i <= len(names) else f"class {i}"
            for i in range(1, cfg.data.num_classes)]


def predict_dicom(model_path: str | Path, dicom_path: str | Path, out_path: str | Path, *,
                  seg_out: str | Path | None = None, largest_component: bool | None = None,
                  device: str = "auto") -> list[Path]:
    """Segment one DICOM series with a saved model.

    Args:
        model_path: a model file written by :func:`fedscan.shared.checkpoint.save_model`.
        dicom_path: a folder holding one image series (other series are an error), or one
            multi-frame file.
        out_path: the label NIfTI to write, on the series' voxel grid.
        seg_out: also write a binary DICOM SEG referencing the series here.
        largest_component: as in :func:`predict_file`.
        device: as in :func:`predict_file`.

    Returns:
        The files written: the NIfTI, then the SEG when asked.

    Raises:
        FedscanError: one line naming the folder, file or model at fault.
    """
    if seg_out is not None and not str(seg_out).endswith(".dcm"):
        raise FedscanError(f"--seg-out {seg_out}: expected a .dcm file name")
    volume = read_series(one_series(dicom_path))
    with tempfile.TemporaryDirectory(prefix="fedscan-dicom-") as tmp:
        image_path = Path(tmp) / "series.nii.gz"
        volume.image.to_filename(image_path)
        try:
            out = predict_file(model_path, image_path, out_path,
                               largest_component=largest_component, device=device)
        except FedscanError as exc:  # name the series, not our temporary file
            raise FedscanError(str(exc).replace(str(image_path), str(dicom_path))) from None
    written = [out]
    if seg_out is not None:
        labels = np.asanyarray(nib.load(out).dataobj)
        written.append(write_seg(labels, volume, Path(seg_out), class_names_of(model_path)))
    return written
