"""Compute over the slot pool. Kernels see slot ids, never the cache.

Every kernel has the signature of :func:`expert_pairs_torch`: it writes the routing-weighted output of
each token-expert pair whose expert is in this wave into a ``[T*k, H]`` buffer, and the caller sums over k.
:func:`select_kernel` picks one for a device: the torch reference (CPU, oracle) or the Triton kernels (CUDA),
imported lazily so that importing this package defines no Triton kernel.
"""

from offload.kernels.activation import ExpertActivation
from offload.kernels.routing import RoutedTokens
from offload.kernels.selection import select_kernel
from offload.kernels.torch_reference import expert_pairs_torch

__all__ = ["ExpertActivation", "RoutedTokens", "expert_pairs_torch", "select_kernel"]
