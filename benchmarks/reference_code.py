"""Running the reference WaveDiff code from a checkout outside this repository (for comparisons only)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator


@contextlib.contextmanager
def no_extension_build() -> Iterator[None]:
    """Stub torch.utils.cpp_extension.load while the reference imports its CUDA ops (its CPU path needs none,
    and there may be no nvcc or GPU here)."""
    import torch.utils.cpp_extension as ext

    original = ext.load
    ext.load = lambda *args, **kwargs: types.SimpleNamespace()
    try:
        yield
    finally:
        ext.load = original
