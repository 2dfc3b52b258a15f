"""The public estimators: estimate_llc (fast and sequential), estimate_wbic,
the Hessian statistics, their results, diagnostics and trust checks."""
