"""Make `import torchvision` (and so `import open_clip`) work with a CPU build of torch.

The registry's torchvision wheel is a CUDA build whose C extension cannot load against the
CPU torch; its Python side then fails at import with
``RuntimeError: operator torchvision::nms does not exist``. `ensure_torchvision()` tries to
load the extension and, when that fails, declares the two operator schemas torchvision's
import registers fake kernels for. Transforms and open_clip work; torchvision's C++ ops and
`torchvision.io` do not (images are decoded with Pillow). With a matching torch it does nothing.
Call it before the first torchvision/open_clip import in a process; it is idempotent, O(1).
"""

from __future__ import annotations

import glob
import importlib.util
import os

_LIB: object = None  # keeps the schema library alive for the life of the process


def ensure_torchvision() -> None:
    global _LIB
    if _LIB is not None:
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for so in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(so)
            _LIB = True
            return
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
