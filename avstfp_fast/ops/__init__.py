"""Attention ops: the ``prompted_attention`` contract and its backends."""
from .attention import explain, prompted_attention, prompted_attention_qkv, qkv_views
from .backends import (Backend, Capabilities, KernelBackend, backend_choices, backend_names,
                       check_backend_name, get_backend, register, select)
from .contract import AttnProblem, make_problem

__all__ = ["prompted_attention", "prompted_attention_qkv", "qkv_views", "explain",
           "Backend", "KernelBackend", "Capabilities", "AttnProblem", "make_problem",
           "backend_names", "backend_choices", "check_backend_name",
           "get_backend", "register", "select"]
