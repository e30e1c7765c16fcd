"""Installs the dependencies that a plain requirements.txt would get wrong.

ComfyUI-Manager runs this after `pip install -r requirements.txt`; scripts/setup.sh runs it too.
- onnxruntime: the GPU, DirectML, ROCm, OpenVINO and CPU builds are different distributions that
  all provide the `onnxruntime` module. Installing one beside another replaces the module, so we
  install one only when none is present: onnxruntime-gpu where an NVIDIA driver answers, else CPU.
- OpenCV: likewise (opencv-python / -headless / -contrib); headless only when `cv2` is missing.
- insightface: its metadata requires CPU `onnxruntime` and `opencv-python`, which would cause
  exactly the clash above, so it is installed without dependencies (the rest are in requirements.txt).
"""
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys

ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-rocm",
    "onnxruntime-openvino", "onnxruntime-silicon", "onnxruntime-qnn",
)
INSIGHTFACE_REQUIREMENT = "insightface>=0.7.3"


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def nvidia_driver_answers() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pip_install(*args: str) -> None:
    print("[ComfyUI-FaceStudio] pip install", " ".join(args), flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])


def main() -> None:
    present = [d for d in ONNXRUNTIME_DISTRIBUTIONS if installed(d)]
    if len(present) > 1:
        print(f"[ComfyUI-FaceStudio] warning: several onnxruntime builds are installed ({', '.join(present)}); "
              "they overwrite each other's files. Uninstall all but one, then reinstall that one.", flush=True)
    if not present:
        pip_install("onnxruntime-gpu" if nvidia_driver_answers() else "onnxruntime")
    if importlib.util.find_spec("cv2") is None:
        pip_install("opencv-python-headless")
    if not installed("insightface"):
        pip_install("--no-deps", INSIGHTFACE_REQUIREMENT)


if __name__ == "__main__":
    main()
