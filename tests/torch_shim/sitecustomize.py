"""On PYTHONPATH of the notebook test's kernel: imports torchvision the way the tests do (torchvision_ops)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import torchvision_ops

    torchvision_ops.import_torchvision()
except ImportError:  # no torch / torchvision: the notebook's PyTorch cell says it skips
    pass
