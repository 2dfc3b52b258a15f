"""The named run configs (``--preset``), as plain data: the command line
lists them without loading torch."""
import math
from typing import Dict

PRESETS: Dict[str, dict] = {
    # Small enough for a laptop CPU in a few minutes; still shows the
    # regression model's first stages (predicting 0, then in-context learning).
    # Every preset's init loss takes all of its LLC set, as docs/paper.md's LR
    # sweep does ("on the full fixed set"): in this one, 4 of its 16 batches
    # left an error above the chains' at 27 of 28 checkpoints.
    "demo": dict(
        task="regression", task_args=dict(task_dim=3, pairs=8),
        model_args=dict(d_model=32, heads=2, layers=2, mlp_width=32),
        train=dict(steps=3000, batch_size=64, lr=3e-3, schedule="one_cycle", log_checkpoints=16,
                   linear_checkpoints=12),
        sweep=dict(num_chains=4, num_draws=150, num_burnin=50, epsilon=1e-3, gamma=6.0, nbeta=60.0,
                   llc_sequences=1024, llc_batch_size=64, eval_sequences=1024, hessian=True, hessian_probes=16,
                   hessian_batch=256, num_init_batches="all")),
    # docs/paper.md's LR model and its later, cheaper LLC sweep.
    "regression": dict(
        task="regression", task_args=dict(task_dim=4, pairs=8),
        model_args=dict(d_model=64, heads=4, layers=2, mlp_width=64),
        train=dict(steps=500_000, batch_size=256, lr=3e-3, schedule="one_cycle", log_checkpoints=100,
                   linear_checkpoints=100),
        sweep=dict(num_chains=8, num_draws=500, num_burnin=500, epsilon=1e-3, gamma=6.0, nbeta=60.0,
                   llc_sequences=4096, llc_batch_size=1024, eval_sequences=2048, hessian=True,
                   hessian_probes=100, hessian_batch=1024, num_init_batches="all")),
    # A small LM on a small synthetic language (vocabulary 128, context 128,
    # more copies): a CPU job of minutes that still shows the LM stages, bigrams
    # first, then previous-token heads, then induction heads.
    "language-demo": dict(
        task="language", task_args=dict(vocab=128, context=128, phrases=20, p_phrase=0.05, p_copy=0.1),
        model_args=dict(d_model=64, heads=4, layers=2),
        train=dict(steps=6000, batch_size=32, lr=3e-3, schedule="constant", log_checkpoints=16,
                   linear_checkpoints=12),
        sweep=dict(num_chains=4, num_draws=100, num_burnin=50, epsilon=1e-3, gamma=300.0, nbeta=20.0,
                   llc_sequences=256, llc_batch_size=16, eval_sequences=128, hessian=True, hessian_probes=8,
                   hessian_batch=16, num_init_batches="all")),
    # docs/paper.md's LM model on the synthetic language.
    "language": dict(
        task="language", task_args=dict(vocab=5000, context=1024),
        model_args=dict(d_model=256, heads=8, layers=2),
        train=dict(steps=50_000, batch_size=100, lr=1e-3, schedule="constant", weight_decay=0.05,
                   log_checkpoints=50, linear_checkpoints=500),
        sweep=dict(num_chains=20, num_draws=200, num_burnin=0, epsilon=3e-3, gamma=300.0,
                   nbeta=round(100 / math.log(100), 4), llc_sequences=2000, llc_batch_size=100,
                   eval_sequences=200, hessian=False, hessian_probes=32, hessian_batch=16, num_init_batches="all")),
}
