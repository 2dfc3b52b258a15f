"""Pure-torch twins of llcfast's kernels.

Every function here has the signature of its counterpart in :mod:`llcfast.ops`
and says in its docstring which kernel it mirrors. Tests
hold the two against each other; the package falls back to these when the
compiled extension is missing.
"""
from .lanczos import lanczos_step_
from .losses import token_nll, token_nll_grad_
from .norms import chain_layer_norm, chain_layer_norm_backward
from .philox import philox4x32_10, philox_normal
from .probes import multi_dot_, rademacher
from .samplers import rmsprop_sgld_step_, sgnht_step_
from .sgld import fold_coefficients, sgld_step_

__all__ = ["chain_layer_norm", "chain_layer_norm_backward", "lanczos_step_", "multi_dot_", "rademacher", "philox4x32_10", "philox_normal", "fold_coefficients", "sgld_step_",
           "rmsprop_sgld_step_", "sgnht_step_", "token_nll", "token_nll_grad_"]
