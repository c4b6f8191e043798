"""The CUDA backend (in progress): NVRTC compilation (`nvrtc`) and CUDA C source templates
for the kernel IR's Template parts (`templates`). Importing this package needs neither
CuPy nor a GPU; `nvrtc.cupy_available()` / `nvrtc.gpu_available()` say what is there."""
