"""Compute over the slot pool. Kernels see slot ids, never the cache.

Every kernel has the signature of :func:`expert_pairs_torch`: it writes the routing-weighted output of
each token-expert pair whose expert is in this wave into a ``[T*k, H]`` buffer, and the caller sums over k.
"""

from offload.kernels.activation import ExpertActivation
from offload.kernels.routing import RoutedTokens
from offload.kernels.torch_ref import expert_pairs_torch

__all__ = ["ExpertActivation", "RoutedTokens", "expert_pairs_torch"]
