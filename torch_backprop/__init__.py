"""torch_backprop: the classic backpropagation recursion as a verified, drop-in PyTorch MLP.

The δ recursion of "Backpropagation of Deep Neural Network" (A. Tse, UCL, 2022) as one
``torch.autograd.Function`` for a whole fully connected stack (:class:`MLPFunction`), wrapped as an
``nn.Module`` (:class:`BackpropMLP`) and proven equal to native autograd by the test suite.

The package has five rooms, each a subpackage whose docstring says what it holds and may import:
``core`` (the slides: activations, phases, the autograd nodes, the module), ``firstorder``
(per-sample gradients, clipping, DP-SGD), ``secondorder`` (curvature, Laplace), ``pde`` (input
derivatives for physics-informed losses) and ``cli`` (the ``torch-backprop`` command). Every public
name is exported here; ``torch_backprop.activations``, ``torch_backprop.functional``,
``torch_backprop.testing``, ``torch_backprop.laplace`` and ``torch_backprop.pde`` are the public
paths of those modules.
"""

from __future__ import annotations

from . import activations, functional, pde, testing
from .core.activations import Activation, available_activations, get_activation, register_activation
from .core.function import MLPFunction
from .core.module import BackpropMLP
from .firstorder.clipping import AdaptiveClipping
from .firstorder.dp_sgd import dp_sgd_step
from .firstorder.noise import GaussianNoise
from .firstorder.per_sample import per_sample
from .optim import ENGD, KFAC
from .pde import input_derivatives, laplacian, residual_jacobian
from .secondorder.curvature import curvature
from .secondorder.products import ggn_vector_product

__all__ = [
    "Activation",
    "AdaptiveClipping",
    "BackpropMLP",
    "ENGD",
    "GaussianNoise",
    "KFAC",
    "MLPFunction",
    "activations",
    "available_activations",
    "curvature",
    "dp_sgd_step",
    "functional",
    "get_activation",
    "ggn_vector_product",
    "input_derivatives",
    "laplacian",
    "pde",
    "per_sample",
    "register_activation",
    "residual_jacobian",
    "testing",
]

__version__ = "0.1.0"
