"""Tracing helper: the one switch between eager shortcuts and traceable code."""
import torch

__all__ = ['is_compiling']


def is_compiling() -> bool:
    """True under torch.compile / torch.export, where sizes may be symbolic and size-dependent
    branches would tie the traced program to its example input; False in eager and TorchScript."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.compiler.is_compiling()
