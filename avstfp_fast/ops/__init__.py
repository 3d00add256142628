"""Attention ops: the ``prompted_attention`` contract and its backends."""
from .attention import explain, prompted_attention, prompted_attention_qkv, qkv_views
from .backends import (Backend, KernelBackend, available_backends, get_backend, register,
                       select)
from .contract import AttnProblem, make_problem

__all__ = ["prompted_attention", "prompted_attention_qkv", "qkv_views", "explain",
           "Backend", "KernelBackend", "AttnProblem", "make_problem", "available_backends",
           "get_backend", "register", "select"]
