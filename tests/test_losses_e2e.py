"""Every Tinker loss through the real SDK, real HTTP, a real server process and real workers.

Each built-in loss's `loss:sum` is recomputed in float64 from the logprobs the server
returned and the inputs sent; top-K cross-entropy travels as sparse CSR; custom losses run
both client-side (the SDK's surrogate) and server-side (`create_custom_loss`), and each
takes the same gradient step as the equivalent built-in loss. An uploaded loss keeps its id
across a server restart, and one that would allocate a huge tensor is refused before it does.
"""
from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.conftest import API_KEY, ServerProcess
from tests.helpers import RawClient, logprobs_of, sft_datum

QWEN = "tiny-qwen3"
PAIRS = [("Question: what do cows drink?\nAnswer:", " Cows drink water."),
         ("Question: where do fish live?\nAnswer:", " Fish live in the sea, mostly.")]
# Makes the first AdamW step proportional to the gradient, so equal steps mean equal gradients.
LINEAR_STEP = types.AdamParams(learning_rate=1.0, eps=1e3)


def float64_loss(loss_fn: str, lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float],
                 coefficient_lp: np.ndarray | None = None) -> float:
    """The documented formula for one datum, in float64 (cispo's stop-gradient clipped ratio is
    taken at `coefficient_lp` when given)."""
    lp = lp.astype(np.float64)
    if loss_fn == "cross_entropy":
        return float(-(lp * inputs["weights"]).sum())
    q, adv = inputs["logprobs"].astype(np.float64), inputs["advantages"].astype(np.float64)
    lo, hi = config.get("clip_low_threshold"), config.get("clip_high_threshold")
    if loss_fn == "importance_sampling":
        return float(-(np.exp(lp - q) * adv).sum())
    if loss_fn == "ppo":
        r = np.exp(lp - q)
        return float(-np.minimum(r * adv, np.clip(r, lo, hi) * adv).sum())
    if loss_fn == "cispo":
        ratio_lp = lp if coefficient_lp is None else coefficient_lp.astype(np.float64)
        return float(-(np.clip(np.exp(ratio_lp - q), lo, hi) * lp * adv).sum())
    if loss_fn == "dro":
        return float(-(lp * adv - 0.5 * config["beta"] * (lp - q) ** 2).sum())
    if loss_fn == "gspo":
        s = np.exp((lp - q)[inputs["sequence_ratio_mask"] != 0].mean())
        return float(-np.minimum(s * adv, np.clip(s, lo, hi) * adv).sum())
    raise KeyError(loss_fn)


@pytest.fixture(scope="module")
def client(server):
    return tinker.ServiceClient(base_url=server.url, api_key=API_KEY)


@pytest.fixture(scope="module")
def sft_data(tokenizer) -> list[types.Datum]:
    return [sft_datum(tokenizer.encode(p), tokenizer.encode(c)) for p, c in PAIRS]


@pytest.fixture(scope="module")
def rl_data(client, sft_data) -> list[types.Datum]:
    """RL datums whose 'sampler' logprobs sit around the learner's, so ratios cross every clip."""
    lp0 = logprobs_of(client.create_lora_training_client(QWEN, rank=4, seed=3).result()
                      .forward(sft_data, "cross_entropy").result())
    rng = np.random.default_rng(5)
    data = []
    for datum, lp in zip(sft_data, lp0):
        n = len(lp)
        completion = datum.loss_fn_inputs["weights"].to_numpy() > 0
        data.append(types.Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "logprobs": (lp + rng.uniform(-0.5, 0.5, n)).astype(np.float32),
            "advantages": np.where(completion, rng.choice([-1.5, 0.7, 2.0], n), 0.0).astype(np.float32),
            "sequence_ratio_mask": completion.astype(np.float32)}))
    return data


def inputs_of(datum: types.Datum) -> dict[str, np.ndarray]:
    return {k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()}


CASES = [
    ("cross_entropy", None, {}),
    ("importance_sampling", None, {}),
    ("ppo", None, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, None),
    ("cispo", None, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, None),
    ("dro", {"beta": 0.5}, None),
    ("dro", None, {"beta": 0.05}),
    ("gspo", None, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ("gspo", {"clip_low_threshold": 0.99, "clip_high_threshold": 1.01}, None),
]


@pytest.mark.parametrize("loss_fn, config, defaults", CASES)
def test_forward_and_forward_backward_report_the_documented_sum(client, sft_data, rl_data, loss_fn, config, defaults):
    data = sft_data if loss_fn == "cross_entropy" else rl_data
    tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    expected_config = config or defaults
    for run in (tc.forward, tc.forward_backward):
        out = run(data, loss_fn, config).result()
        lps = logprobs_of(out)
        want = sum(float64_loss(loss_fn, lp, inputs_of(d), expected_config) for lp, d in zip(lps, data))
        assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-5), run.__name__
        assert [lp.shape for lp in lps] == [d.loss_fn_inputs["target_tokens"].to_numpy().shape for d in data]


def test_each_loss_is_lowered_by_one_optimizer_step(client, sft_data, rl_data):
    tc = client.create_lora_training_client(QWEN, rank=4, seed=4).result()
    tc.forward_backward(sft_data, "cross_entropy").result()  # B starts at 0: give every adapter weight a value
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    descend = types.AdamParams(learning_rate=1e-3, beta1=0.0)  # no momentum: this step follows this loss only
    for loss_fn, config, defaults in CASES:
        data = sft_data if loss_fn == "cross_entropy" else rl_data
        out = tc.forward_backward(data, loss_fn, config).result()
        tc.optim_step(descend).result()
        after = logprobs_of(tc.forward(data, loss_fn, config).result())
        # The objective at the new weights, with cispo's stop-gradient coefficient held at the old ones.
        after_loss = sum(float64_loss(loss_fn, lp, inputs_of(d), config or defaults, coefficient_lp=old)
                         for lp, old, d in zip(after, logprobs_of(out), data))
        assert after_loss < out.metrics["loss:sum"], (loss_fn, config, out.metrics["loss:sum"], after_loss)


def test_top_k_cross_entropy_from_sparse_inputs(client, sft_data):
    base = sft_data[0]
    first = torch.tensor(base.loss_fn_inputs["target_tokens"].to_numpy())
    n, k = len(first), 6
    targets = torch.zeros(n, k, dtype=torch.int64)  # unused cells: token 0 with weight 0
    targets[:, 0], targets[:, 1] = first, (first + 7) % 1000
    weights = torch.zeros(n, k)
    weights[:, 0], weights[::2, 1] = 0.75, -0.25
    datum = types.Datum(model_input=base.model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights})
    assert datum.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None, "the SDK should send CSR"
    assert datum.loss_fn_inputs["weights"].sparse_crow_indices is not None

    tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    out = tc.forward([datum], "cross_entropy").result()
    lp = logprobs_of(out)[0]
    assert lp.shape == (n, k)
    for column in range(k):  # each column is the plain log-prob of that column's tokens
        single = types.Datum(model_input=base.model_input, loss_fn_inputs={
            "target_tokens": targets[:, column].numpy(), "weights": np.ones(n, np.float32)})
        np.testing.assert_allclose(lp[:, column], logprobs_of(tc.forward([single], "cross_entropy").result())[0],
                                   atol=1e-5, rtol=0)
    want = float(-(lp * weights.numpy().astype(np.float64)).sum())
    assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4)
    assert tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(want, rel=1e-4)


def torch_ppo(data, logprobs_list):
    """PPO with the default clips, written by a user on the client."""
    total = torch.zeros(())
    for datum, lp in zip(data, logprobs_list):
        q, adv = (datum.loss_fn_inputs[k].to_torch() for k in ("logprobs", "advantages"))
        r = torch.exp(lp - q)
        total = total - torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv).sum()
    return total, {"ppo:sum": total.item()}


def step_outcome(client, data, train) -> tuple[float, float, list[np.ndarray]]:
    """(loss:sum, gradient norm, logprobs after a gradient-proportional step) from a fresh adapter."""
    tc = client.create_lora_training_client(QWEN, rank=4, seed=6).result()
    loss = train(tc).result().metrics["loss:sum"]
    norm = tc.optim_step(LINEAR_STEP).result().metrics["grad_norm:mean"]
    return loss, norm, logprobs_of(tc.forward(data, "importance_sampling").result())


def assert_same_step(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-4)
    assert a[1] == pytest.approx(b[1], rel=1e-4) and a[1] > 0
    for x, y in zip(a[2], b[2]):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_client_side_custom_loss_takes_the_same_step_as_the_built_in_loss(client, rl_data):
    custom = step_outcome(client, rl_data, lambda tc: tc.forward_backward_custom(rl_data, torch_ppo))
    built_in = step_outcome(client, rl_data, lambda tc: tc.forward_backward(rl_data, "ppo"))
    assert_same_step(custom, built_in)


def ppo_uploaded(logprobs, sampler_logprobs, advantages, scale):
    r = torch.exp(logprobs - sampler_logprobs)
    loss = -torch.minimum(r * advantages, torch.clamp(r, 0.8, 1.2) * advantages).sum() * scale
    return loss, {"custom/ppo:sum": loss, "custom/ratio:mean": r.mean()}


def test_server_side_custom_loss_runs_on_the_server_and_matches_the_built_in_loss(client, rl_data):
    ranks = {"logprobs": 1, "sampler_logprobs": 1, "advantages": 1, "scale": 0}
    handle = client.create_custom_loss(ppo_uploaded, ranks).result()
    assert handle.loss_id is not None, "the server advertises custom_loss_server_side, so the SDK uploads the loss"
    one = types.TensorData(data=[1.0], dtype="float32", shape=[])
    data = [types.Datum(model_input=d.model_input, loss_fn_inputs={
        **d.loss_fn_inputs, "sampler_logprobs": d.loss_fn_inputs["logprobs"], "scale": one}) for d in rl_data]
    results = {}
    custom = step_outcome(client, data, lambda tc: results.setdefault("out", tc.forward_backward_custom(data, handle)))
    built_in = step_outcome(client, data, lambda tc: tc.forward_backward(rl_data, "ppo"))
    assert_same_step(custom, built_in)
    metrics = results["out"].result().metrics
    assert metrics["custom/ppo:sum"] == pytest.approx(metrics["loss:sum"], rel=1e-6)
    assert "surrogate_loss:sum" not in metrics, "a server-side loss needs no client-side surrogate"
    lps = logprobs_of(results["out"].result())
    ratios = [np.exp(lp - d.loss_fn_inputs["logprobs"].to_numpy()).mean() for lp, d in zip(lps, rl_data)]
    assert metrics["custom/ratio:mean"] == pytest.approx(np.mean(ratios), rel=1e-4)


def test_bad_losses_fail_alone_with_a_clear_user_error(server, client, sft_data, rl_data):
    tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    with pytest.raises(tinker.RequestFailedError) as e:
        tc.forward_backward(rl_data, "stable_reinforce").result()
    assert e.value.category == types.RequestErrorCategory.User
    assert "'stable_reinforce' is not supported" in str(e.value) and "'importance_sampling'" in str(e.value)
    with pytest.raises(tinker.RequestFailedError, match=r"clip_low_threshold=1.5, clip_high_threshold=1.2"):
        tc.forward(rl_data, "ppo", {"clip_low_threshold": 1.5}).result()

    raw = RawClient(server.url)
    evil = {"format": 1, "nodes": [
        {"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}},
        {"op": "call_function", "name": "system", "target": "os.system", "args": ["touch /tmp/pwned"], "kwargs": {}},
        {"op": "output", "name": "output", "target": "output",
         "args": [{"tuple": [{"ref": "system"}, {"dict": {}}]}], "kwargs": {}}]}
    handle = raw.post("create_custom_loss", {"session_id": raw.session(), "custom_loss_seq_id": 0, "name": "evil",
                                             "inputs": [{"name": "logprobs", "rank": 1}], "graph": evil,
                                             "type": "create_custom_loss"}).json()
    failure = raw.result(handle["request_id"])
    assert failure["category"] == "user" and "'os.system'" in failure["error"]

    assert tc.forward(sft_data, "cross_entropy").result().metrics["loss:sum"] > 0  # the client keeps working


def masked_nll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss, "custom/tokens:mean": (weights > 0).float().sum()}


def test_an_uploaded_loss_id_still_works_after_a_server_restart(tiny_models, tmp_path, sft_data):
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir, {QWEN: tiny_models[QWEN]}, log_name="first.log").start()
    try:
        client = tinker.ServiceClient(base_url=first.url, api_key=API_KEY)
        handle = client.create_custom_loss(masked_nll, {"logprobs": 1, "weights": 1}).result()
        tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
        before = tc.forward_backward_custom(sft_data, handle).result().metrics
    finally:
        first.stop()
    assert len(list((data_dir / "custom_losses").glob(f"*/{handle.loss_id}.json"))) == 1  # in its session's folder

    # Same data dir and port: the client, its session and its loss handle carry on.
    second = ServerProcess(data_dir, {QWEN: tiny_models[QWEN]}, log_name="second.log")
    second.port, second.url = first.port, first.url
    second.start()
    try:
        tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
        after = tc.forward_backward_custom(sft_data, handle).result().metrics
        assert before["loss:sum"] > 0 and before["custom/tokens:mean"] > 0
        assert after == pytest.approx(before, rel=1e-6)
        other = tinker.ServiceClient(base_url=second.url, api_key=API_KEY).create_lora_training_client(
            QWEN, rank=4, seed=3).result()
        with pytest.raises(tinker.RequestFailedError, match="belongs to another session"):
            other.forward_backward(sft_data, "custom", {"loss_id": handle.loss_id}).result()
    finally:
        second.stop()


def outer_product(logprobs):
    wide = logprobs.sum().expand(1 << 20)  # a view: 2**20 elements, allocates nothing
    return (wide.reshape(-1, 1) * wide.reshape(1, -1)).sum(), {}  # would be 2**40 elements (4 TiB)


def test_a_loss_that_would_allocate_a_huge_tensor_is_refused_before_it_does(client, sft_data):
    handle = client.create_custom_loss(outer_product, {"logprobs": 1}).result()
    tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    with pytest.raises(tinker.RequestFailedError) as e:
        tc.forward_backward_custom(sft_data, handle).result()
    assert e.value.category == types.RequestErrorCategory.User
    assert "node 'mul' (operator.mul) would make 1099511627776 tensor elements on datum 0" in str(e.value)
    assert tc.forward_backward(sft_data, "cross_entropy").result().metrics["loss:sum"] > 0  # the server carries on


@pytest.fixture(scope="module")
def server_tp2(tiny_models, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("losses-tp2"), {QWEN: tiny_models[QWEN]}, workers=2).start()
    yield srv
    srv.stop()


def test_top_k_logprobs_and_gradients_are_exact_under_tensor_parallelism(server, server_tp2, sft_data):
    base = sft_data[1]
    first = torch.tensor(base.loss_fn_inputs["target_tokens"].to_numpy())
    targets = torch.stack([first, (first * 31 + 5) % 151000, torch.full_like(first, 150000)], dim=1)
    weights = torch.tensor([[1.0, -0.5, 0.25]]).expand(len(first), 3).contiguous()
    datum = types.Datum(model_input=base.model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights})
    outcomes = []
    for srv in (server, server_tp2):
        tc = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY).create_lora_training_client(QWEN, rank=4, seed=8).result()
        tc.forward_backward(sft_data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # B != 0, so A gets gradients too
        out = tc.forward_backward([datum], "cross_entropy").result()
        norm = tc.optim_step(LINEAR_STEP).result().metrics["grad_norm:mean"]
        outcomes.append((logprobs_of(out)[0], out.metrics["loss:sum"], norm))
    (lp1, loss1, norm1), (lp2, loss2, norm2) = outcomes
    np.testing.assert_allclose(lp2, lp1, atol=1e-5, rtol=0)
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    assert norm2 == pytest.approx(norm1, rel=1e-5)
