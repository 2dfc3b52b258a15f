"""Run configs small enough for the test suite."""
from llcfast.pipeline import RunConfig


def tiny(steps: int = 40, **sweep) -> RunConfig:
    return RunConfig.from_dict(dict(
        task="regression", task_args=dict(task_dim=2, pairs=4),
        model_args=dict(d_model=8, heads=2, layers=1, mlp_width=8),
        train=dict(steps=steps, batch_size=16, lr=3e-3, log_checkpoints=4, linear_checkpoints=3),
        sweep=dict(dict(num_chains=3, num_draws=8, epsilon=1e-3, gamma=10.0, nbeta=10.0, llc_sequences=64,
                        llc_batch_size=16, eval_sequences=64, hessian=False, hessian_probes=2, hessian_batch=32),
                   **sweep)))


def tiny_language(steps: int = 30, **sweep) -> RunConfig:
    return RunConfig.from_dict(dict(
        task="language", task_args=dict(vocab=32, context=16, phrases=4, copy_length=(3, 5)),
        model_args=dict(d_model=16, heads=2, layers=2),
        train=dict(steps=steps, batch_size=8, lr=3e-3, schedule="constant", log_checkpoints=3, linear_checkpoints=2),
        sweep=dict(dict(num_chains=2, num_draws=6, epsilon=1e-3, gamma=100.0, nbeta=10.0, llc_sequences=32,
                        llc_batch_size=8, eval_sequences=16, hessian=False, hessian_probes=2, hessian_batch=8),
                   **sweep)))
