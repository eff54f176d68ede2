"""Model loading: HF directories and the offline models shipped in pip packages (see ``offline``)."""
