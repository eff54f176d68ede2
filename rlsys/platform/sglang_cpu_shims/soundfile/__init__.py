"""CPU stand-in for ``soundfile``: sglang's HTTP server imports it for its OpenAI audio
transcription route (``sglang/srt/entrypoints/openai/audio_chunking.py``), which rollout never
calls. Every name is a placeholder."""

import sys

from rlsys_cpu_stand_in import make_stand_in_package

__version__ = "0.0.0"

make_stand_in_package(sys.modules[__name__])
