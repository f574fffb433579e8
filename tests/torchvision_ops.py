"""Importing torchvision (and timm, which imports it) next to the CPU build of torch.

The package index this project's CI installs from has torch's CPU wheel but only the CUDA build of
torchvision, whose C++ operators (nms, roi_align, ...) cannot load against CPU torch; torchvision then
fails at import while registering their fake kernels. The models the exports target (ResNet, and timm's
ViT) are pure Python and never call those operators, so the tests import torchvision with those
registrations skipped. A user's matching torch + torchvision (e.g. both CPU builds) needs none of this.
"""

import importlib


def import_torchvision():
    """torchvision, imported with failing fake-kernel registrations of its C++ operators skipped; raises
    ImportError when torch or torchvision is not installed."""
    import torch.library

    original = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        try:
            decorator = original(op, *args, **kwargs)
        except RuntimeError:  # the operator does not exist: its C++ library did not load
            return lambda fn: fn
        if not callable(decorator):
            return decorator

        def apply(fn):
            try:
                return decorator(fn)
            except RuntimeError:
                return fn
        return apply

    torch.library.register_fake = tolerant
    try:
        return importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = original
