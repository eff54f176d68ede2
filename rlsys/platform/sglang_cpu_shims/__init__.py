"""Stand-in packages for sglang processes on CPU; see ``rlsys/platform/sglang_cpu.py``.

This folder is put first on ``PYTHONPATH`` of sglang's processes on CPU (never on the trainer's
path), where ``triton``, ``torchvision``, ``sgl_kernel``, ``xgrammar``, ``soundfile`` and
``python_multipart`` resolve to the packages here, and where Python runs ``sitecustomize.py`` at
start (the warning filters of ``rlsys.platform.quiet``). It is a package itself only so that the files
ship with rlsys; nothing imports ``rlsys.platform.sglang_cpu_shims``.
"""
