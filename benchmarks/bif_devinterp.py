"""estimate_bif and estimate_susceptibilities beside devinterp 2.0.1's bif and
susceptibilities on a small attention-only LM: one model, one data set, one
set of sampler settings; how far apart the two answers are against their
errors, and the wall time of each call side by side.

devinterp 2.0.1 needs datasets, xarray and zarr, which llcfast does not, so
it runs from an environment of its own that sees this checkout:

    python3 -m venv --system-site-packages /tmp/di2 && /tmp/di2/bin/pip install devinterp==2.0.1
    PYTHONPATH=. /tmp/di2/bin/python benchmarks/bif_devinterp.py [--quick]

How the two map: devinterp's ``lr`` is epsilon, ``n_beta`` nbeta and
``localization`` gamma; its observables are fixed sequences evaluated at
every draw, as ours are; "sequence" correlation is the Pearson correlation of
per-sequence mean token losses over every chain's draws stacked and centred
on their common mean, ours with pooling="stack". Its susceptibility formula
is the one in llcfast/estimate/susceptibilities.py; its L0 is the mean loss
at w* over its init batches, ours the unrestricted run's loss at w* on the
loader. The two samplers draw different noise and batches, so the answers
agree only within their errors: the table gives z = difference / (sqrt 2 x
llcfast's chain-bootstrap standard error).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llcfast  # noqa: E402
from llcfast.pipeline.models import AttentionOnlyLM  # noqa: E402

VOCAB, CONTEXT = 24, 16


def language(n: int, seed: int) -> torch.Tensor:
    """Sequences of a fixed random bigram chain: [n, CONTEXT + 1] token ids."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens = torch.empty(n, CONTEXT + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
    for t in range(1, CONTEXT + 1):
        tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=gen)[:, 0]
    return tokens


def trained_model(data: torch.Tensor, steps: int) -> AttentionOnlyLM:
    torch.manual_seed(0)
    model = AttentionOnlyLM(vocab=VOCAB, d_model=32, heads=2, layers=1, context=CONTEXT + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (32,))]
        loss = per_token(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def per_token(model, tokens):
    """devinterp's per-token loss: the model reads every token, position t predicts t + 1."""
    logits = model(tokens)
    return -torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


def mean_loss(model, tokens):
    return per_token(model, tokens).mean()


def run(args) -> dict:
    from datasets import Dataset
    from devinterp.slt.bif import bif
    from devinterp.slt.susceptibilities import susceptibilities

    train = language(512, seed=1)
    probe = language(args.batch, seed=2)
    model = trained_model(train, args.train_steps)
    settings = dict(epsilon=args.epsilon, nbeta=args.nbeta, gamma=args.gamma, num_chains=args.chains,
                    num_draws=args.draws, num_burnin=args.burnin)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True)
    dataset = Dataset.from_dict({"input_ids": train.tolist()}).with_format("torch")
    probe_set = Dataset.from_dict({"input_ids": probe.tolist()}).with_format("torch")
    rows = {}

    started = time.perf_counter()
    ours = llcfast.estimate_bif(model, loader, {"probe": [probe]}, per_sample_loss_fn=per_token, loss_fn=mean_loss,
                                unit="sequence", pooling="stack", progress=False, trust_checks=False,
                                draw_batches="step", **settings)
    rows["llcfast_bif_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bif(model, dataset, {"probe": (probe_set, 1)}, lr=args.epsilon, n_beta=args.nbeta,
                     localization=args.gamma, num_chains=args.chains, num_draws=args.draws,
                     num_burnin_steps=args.burnin, batch_size=args.batch, correlation_method="sequence",
                     reduce_chain_dimension_method="stack", device="cpu")
    rows["devinterp_bif_s"] = time.perf_counter() - started
    their_bif = np.asarray(theirs["influences"].values, dtype=np.float64)
    # devinterp orders the probe's sequences by its own deterministic shuffle: match rows by content
    their_ids = np.asarray(theirs["input_ids"].values)
    index = [next(i for i, row in enumerate(their_ids) if np.array_equal(row, seq)) for seq in probe.numpy()]
    their_bif = their_bif[np.ix_(index, index)]
    off = ~np.eye(len(probe), dtype=bool)
    z = (ours.influence - their_bif)[off] / (math.sqrt(2) * ours.se[off])
    rows["bif"] = {"n": int(len(probe)), "mean_abs_z": float(np.mean(np.abs(z))),
                   "share_within_2se": float(np.mean(np.abs(z) < 2)),
                   "correlation_of_matrices": float(np.corrcoef(ours.influence[off], their_bif[off])[0, 1]),
                   "mean_offdiag_llcfast": float(ours.influence[off].mean()),
                   "mean_offdiag_devinterp": float(their_bif[off].mean())}

    restrictions = {"full": None, "attention": ["blocks.0.*"], "unembed": ["unembed.*"]}
    masks = {name: {n: None for n, _ in model.named_parameters() if n.startswith(prefix)}
             for name, prefix in (("attention", "blocks.0."), ("unembed", "unembed."))}
    masks["full"] = None
    task = language(args.batch, seed=3)
    started = time.perf_counter()
    ours_sus = llcfast.estimate_susceptibilities(
        model, loader, {"task": [task], "probe": [probe]}, restrictions, sampling_task="task",
        per_sample_loss_fn=per_token, loss_fn=mean_loss, unit="token", progress=False, trust_checks=False,
        draw_batches="step", **settings)
    rows["llcfast_susceptibilities_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = susceptibilities(model, dataset, {"task": (Dataset.from_dict({"input_ids": task.tolist()}).with_format("torch"), 1),
                                                 "probe": (probe_set, 1)}, masks, sampling_task="task",
                                lr=args.epsilon, n_beta=args.nbeta, localization=args.gamma,
                                num_chains=args.chains, num_draws=args.draws, num_burnin_steps=args.burnin,
                                batch_size=args.batch, device="cpu")
    rows["devinterp_susceptibilities_s"] = time.perf_counter() - started
    sus = tree["susceptibilities"].dataset
    context = tree["context"].dataset
    # devinterp's rows are (batch, target position) of its own shuffle of the probe: match them by content
    their_batches = np.asarray(context["batch"].values)
    their_tokens = np.asarray(context["input_ids"].values)
    sequences = {int(b): their_tokens[their_batches == b] for b in np.unique(their_batches)}
    ours_frame = ours_sus.to_frame()
    rows["susceptibilities"] = {}
    for wr in ("attention", "unembed"):
        theirs_by = {}
        for b, t, value in zip(sus["batch"].values, sus["target_position"].values, sus["sus"].sel(wr=wr).values):
            ours_index = next(i for i, seq in enumerate(probe.numpy()) if np.array_equal(seq, sequences[int(b)]))
            theirs_by[(ours_index, int(t) - 1)] = float(value)
        mine = ours_frame[wr].to_numpy()
        paired = np.array([theirs_by[(int(sample), int(pos))] for sample, pos in
                           zip(ours_frame["sample"], ours_frame["position"])])
        rows["susceptibilities"][wr] = {
            "tokens": int(len(mine)), "mean_llcfast": float(mine.mean()), "mean_devinterp": float(paired.mean()),
            "sd_llcfast": float(mine.std()), "sd_devinterp": float(paired.std()),
            "correlation_token_by_token": float(np.corrcoef(mine, paired)[0, 1])}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--burnin", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epsilon", type=float, default=1e-3)
    p.add_argument("--nbeta", type=float, default=20.0)
    p.add_argument("--gamma", type=float, default=100.0)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="2 chains x 10 draws: a smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.chains, args.draws, args.burnin, args.train_steps = 2, 10, 5, 20
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args)
    from importlib.metadata import version
    record = {"date": datetime.date.today().isoformat(), "device": f"{platform.processor() or 'cpu'}, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__, "devinterp": version("devinterp"),
              "settings": vars(args), "rows": rows}
    text = json.dumps(record, indent=1)
    print(text)
    out = args.out or (None if args.quick else os.path.join(os.path.dirname(__file__), "results",
                                                            f"bif_devinterp_cpu_{record['date']}.json"))
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
