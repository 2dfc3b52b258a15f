"""estimate_susceptibilities: the running sums against the formula on stored
traces (the twin), a sample that is the sampling task itself has none, the
fast and reference backends agree, and bad input is named."""
import numpy as np
import pytest
import torch

import llcfast
from llcfast.estimate.susceptibilities import susceptibilities_from_traces


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(9, 4), torch.nn.Linear(4, 9))
    tokens = torch.randint(0, 9, (12, 6))
    return model, tokens


def per_token(model, batch):
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")


def mean_loss(model, batch):
    return per_token(model, batch).mean()


KW = dict(per_sample_loss_fn=per_token, loss_fn=mean_loss, gamma=20.0, epsilon=2e-3, num_chains=3, num_draws=30,
          num_burnin=10, progress=False, trust_checks=False)


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_running_sums_equal_the_twin_and_the_task_itself_has_none():
    model, tokens = problem()
    observables = {"task": [tokens[:4]], "probe": [tokens[6:8]], "copy": [tokens[:4]]}
    restrictions = {"full": None, "embed": ["0.*"], "head": ["1.*"]}
    r = llcfast.estimate_susceptibilities(model, [tokens[:6], tokens[6:]], observables, restrictions,
                                          sampling_task="task", keep_traces=True, **KW)
    assert r.restrictions == ["embed", "head"] and r.values.shape == (2 * 5 + 4 * 5, 2)
    assert r.labels[0] == ("probe", 0, 0) and r.labels[10] == ("copy", 0, 0)
    traces, task = r.config["traces"], slice(*r.config["task_columns"])
    for k, name in enumerate(r.restrictions):
        want = susceptibilities_from_traces(traces["full"], traces[name], task, r.config["init_loss"])
        np.testing.assert_allclose(r.values[:, k], want[task.stop:], rtol=1e-9, atol=1e-12)
    # the restriction moved the run: the two columns differ
    assert not np.allclose(r.values[:, 0], r.values[:, 1])
    # "copy" is the sampling task's batch: its tokens' mean over the set is pt itself, so their mean chi is 0
    copy_mean = r.values[10:].mean(axis=0)
    np.testing.assert_allclose(copy_mean, 0.0, atol=1e-12)
    frame = r.to_frame()
    assert list(frame.columns) == ["observable", "sample", "position", "embed", "head"] and len(frame) == 30


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_fast_and_reference_backends_agree():
    model, tokens = problem()
    observables = {"task": [tokens[:3]], "probe": [tokens[6:8]]}
    args = (model, [tokens[:6], tokens[6:]], observables, {"full": None, "head": ["1.*"]})
    fast = llcfast.estimate_susceptibilities(*args, sampling_task="task", unit="sequence", **KW)
    ref = llcfast.estimate_susceptibilities(*args, sampling_task="task", unit="sequence", backend="reference", **KW)
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("restrictions, task, extra, message", [
    ({"head": ["1.*"]}, "task", {}, "holding 'full': None"),
    ({"full": None}, "task", {}, "holds only 'full'"),
    ({"full": None, "head": ["1.*"]}, "nothing", {}, "sampling_task 'nothing' is not among"),
    ({"full": None, "head": ["1.*"]}, "task", {"restrict": ["0.*"]}, "do not pass restrict"),
])
def test_bad_arguments_are_named(restrictions, task, extra, message):
    model, tokens = problem()
    with pytest.raises(ValueError, match=message):
        llcfast.estimate_susceptibilities(model, [tokens], {"task": [tokens[:2]], "probe": [tokens[2:4]]},
                                          restrictions, sampling_task=task, **dict(KW, **extra))


def test_only_the_task_as_observable_is_refused():
    model, tokens = problem()
    with pytest.raises(ValueError, match="every observable is the sampling task"):
        llcfast.estimate_susceptibilities(model, [tokens], {"task": [tokens[:2]]}, {"full": None, "h": ["1.*"]},
                                          sampling_task="task", **KW)
