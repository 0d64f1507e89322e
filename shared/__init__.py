"""Code both sides use: config, data contract, preprocessing, tasks, inference, reports."""

import logging
import warnings

# With pydicom installed (DICOM import), every MONAI LoadImage also builds MONAI's GPU DICOM
# reader, which logs and warns on each construction when nvImageCodec/CUDA are absent.
# fedscan never reads DICOM through MONAI (shared/dicom_io.py does), so keep the console clean.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
