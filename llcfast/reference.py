"""The pure-torch llcfast: the twin of every kernel (llcfast.twins) and the
sequential twin of the whole estimator, ``estimate_llc``, which runs one
chain after another through those twins with the fast engine's arguments,
noise and draws. Tests hold the fast paths to these."""
from .estimate.sequential import estimate_llc
from .twins import (chain_layer_norm, chain_layer_norm_backward, fold_coefficients, lanczos_step_, multi_dot_,
                    philox4x32_10, philox_normal, rademacher, rmsprop_sgld_step_, sgld_step_, sgnht_step_, token_nll,
                    token_nll_grad_)

__all__ = ["chain_layer_norm", "chain_layer_norm_backward", "estimate_llc", "fold_coefficients", "lanczos_step_",
           "multi_dot_", "philox4x32_10", "philox_normal", "rademacher", "rmsprop_sgld_step_", "sgld_step_",
           "sgnht_step_", "token_nll", "token_nll_grad_"]
