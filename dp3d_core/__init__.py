"""DiffPortrait3D core.

Torch-free modules (numpy only, importable inside Blender): ``cameras``, ``job``, ``protocol``.
Everything else needs torch and runs in the worker subprocess or in training.
Inside this package use relative imports only: the extension zip bundles it as a sub-package.
"""
__version__ = "0.1.0"

import warnings as _warnings

# diffusers' Kandinsky module warns at import time on every CPU-only machine; it is noise for our users.
_warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported")
