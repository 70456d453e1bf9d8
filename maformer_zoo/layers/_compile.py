"""Tracing helper: the one switch between eager shortcuts and traceable code."""
import torch


def is_compiling() -> bool:
    """True under torch.compile / torch.export (symbolic sizes); False in eager and TorchScript."""
    if torch.jit.is_scripting():
        return False
    else:  # the else keeps TorchScript from compiling the call
        return torch.compiler.is_compiling()
