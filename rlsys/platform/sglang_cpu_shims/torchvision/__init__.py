"""CPU stand-in for ``torchvision``: the registry's wheel is CUDA-linked and fails to load with
the CPU build of torch.

Two things need a torchvision on sglang's import path: ``sglang.srt.configs.deepseek_ocr`` imports
``torchvision.transforms`` at module level, and transformers only defines ``AutoImageProcessor``
(which sglang's multimodal configs register against at import) when it finds a torchvision. Every
name here is a placeholder; rollout of text models never reaches image code.
"""

import sys

from rlsys_cpu_stand_in import make_stand_in_package

__version__ = "0.0.0"

make_stand_in_package(sys.modules[__name__])
