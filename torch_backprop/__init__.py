"""torch_backprop: the classic backpropagation recursion as a verified, drop-in PyTorch MLP.

The δ recursion of "Backpropagation of Deep Neural Network" (A. Tse, UCL, 2022) as one
``torch.autograd.Function`` for a whole fully connected stack (:class:`MLPFunction`), wrapped as an
``nn.Module`` (:class:`BackpropMLP`) and proven equal to native autograd by the test suite.
"""

from __future__ import annotations

from . import activations, functional, testing
from .activations import Activation, available_activations, get_activation, register_activation
from .clipping import AdaptiveClipping
from .curvature import curvature
from .dp import dp_sgd_step
from .function import MLPFunction
from .module import BackpropMLP
from .per_sample import per_sample
from .second_order import ggn_vector_product

__all__ = [
    "Activation",
    "AdaptiveClipping",
    "BackpropMLP",
    "MLPFunction",
    "activations",
    "available_activations",
    "curvature",
    "dp_sgd_step",
    "functional",
    "get_activation",
    "ggn_vector_product",
    "per_sample",
    "register_activation",
    "testing",
]

__version__ = "0.1.0"
