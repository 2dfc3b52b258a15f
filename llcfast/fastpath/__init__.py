"""GPU-only rewrites of the engine's step: chain folds of attention, layer
norm and linear layers, the fused unembedding-and-loss, the fused token loss
and bf16 weight copies. Each is off unless the ``fastpath`` settings turn it
on, and each computes what the plain torch path computes."""
