"""Unit tests of the pure loss code: every built-in loss against an independent float64
implementation of the documented formula (value and gradient w.r.t. the logprobs), the
request checks that guard them, the allow-list interpreter behind server-side custom
losses (and its element cap, checked before anything is allocated), and the store that keeps
uploaded losses on disk."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss
from tinker.proto.request_conv import forward_backward_request_to_proto

from backends.common.custom_loss import CustomLoss
from backends.common.losses import LOSSES, compute_loss
from engine.messages import UserError
from handlers.codec import DatumIn, ForwardBackwardIn, decode_forward_backward
from handlers.state import CustomLossStore, LruDict
from handlers.validation import validate_forward_backward

N = 64
RNG = np.random.default_rng(0)
LP = RNG.uniform(-4.0, -0.05, N)
Q = LP + RNG.uniform(-0.6, 0.6, N)  # ratios exp(lp - q) from ~0.55 to ~1.8: inside and outside the clips
A = np.where(RNG.random(N) < 0.2, 0.0, RNG.normal(0, 1.5, N))  # positive, negative and zero advantages
W = RNG.uniform(-2.0, 2.0, N)
MASK = (RNG.random(N) < 0.7).astype(np.float64)
CONFIGS = {"ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
           "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.3},
           "dro": {"beta": 0.7},
           "gspo": {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}}


# ---- the documented formulas, in float64 numpy, with hand-derived gradients d loss / d lp -------
def clipped_min(ratio, adv, low, high):
    """-sum(min(ratio*A, clip(ratio)*A)) and its gradient when d ratio / d lp = ratio."""
    unclipped, clipped = ratio * adv, np.clip(ratio, low, high) * adv
    inside = (ratio >= low) & (ratio <= high)
    grad = np.where((unclipped < clipped) | inside, -ratio * adv, 0.0)
    return -np.minimum(unclipped, clipped).sum(), grad


def reference(loss_fn, lp, config):
    r = np.exp(lp - Q)
    if loss_fn == "cross_entropy":
        return -(lp * W).sum(), -W
    if loss_fn == "importance_sampling":
        return -(r * A).sum(), -r * A
    if loss_fn == "ppo":
        return clipped_min(r, A, config["clip_low_threshold"], config["clip_high_threshold"])
    if loss_fn == "cispo":
        coefficient = np.clip(r, config["clip_low_threshold"], config["clip_high_threshold"])
        return -(coefficient * lp * A).sum(), -coefficient * A
    if loss_fn == "dro":
        beta = config["beta"]
        return -(lp * A - 0.5 * beta * (lp - Q) ** 2).sum(), -A + beta * (lp - Q)
    if loss_fn == "gspo":
        s = np.exp((lp - Q)[MASK != 0].mean())
        return clipped_min(np.full(N, s), A, config["clip_low_threshold"], config["clip_high_threshold"])
    raise KeyError(loss_fn)


def ours(loss_fn, lp, config):
    x = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    inputs = {"weights": torch.tensor(W), "logprobs": torch.tensor(Q), "advantages": torch.tensor(A),
              "sequence_ratio_mask": torch.tensor(MASK)}
    total, elementwise, metrics = compute_loss(loss_fn, [x], [inputs], config)
    total.backward()
    assert metrics == {"loss:sum": pytest.approx(float(total.detach()))}
    assert torch.allclose(elementwise[0].sum(), total)
    return float(total.detach()), x.grad.numpy()


@pytest.mark.parametrize("loss_fn", sorted(LOSSES))
def test_each_loss_matches_its_documented_formula_in_value_and_gradient(loss_fn):
    config = CONFIGS.get(loss_fn, {})
    value, grad = ours(loss_fn, LP, config)
    want_value, want_grad = reference(loss_fn, LP, config)
    assert value == pytest.approx(want_value, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_the_data_exercises_both_sides_of_every_clip():
    r = np.exp(LP - Q)
    for loss_fn in ("ppo", "cispo"):
        low, high = CONFIGS[loss_fn]["clip_low_threshold"], CONFIGS[loss_fn]["clip_high_threshold"]
        assert (r < low).any() and (r > high).any() and ((r >= low) & (r <= high)).any()
    s = np.exp((LP - Q)[MASK != 0].mean())
    gspo = CONFIGS["gspo"]
    assert not gspo["clip_low_threshold"] <= s <= gspo["clip_high_threshold"], "gspo's ratio should be clipped"


def test_gspo_unclipped_gives_every_token_the_sequence_ratio_as_gradient_weight():
    config = {"clip_low_threshold": 0.0, "clip_high_threshold": 100.0}
    _, grad = ours("gspo", LP, config)
    s = np.exp((LP - Q)[MASK != 0].mean())
    np.testing.assert_allclose(grad, -s * A, rtol=1e-10)


def test_missing_config_keys_take_the_documented_defaults():
    assert LOSSES["ppo"].config == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert LOSSES["cispo"].config == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    for loss_fn in ("ppo", "cispo", "dro", "gspo"):
        assert ours(loss_fn, LP, {})[0] == pytest.approx(reference(loss_fn, LP, LOSSES[loss_fn].config)[0], rel=1e-12)


def test_losses_are_sums_over_datums_not_means():
    lp = torch.tensor(LP, requires_grad=True)
    inputs = {"logprobs": torch.tensor(Q), "advantages": torch.tensor(A)}
    halves = [(lp[:20], {k: v[:20] for k, v in inputs.items()}), (lp[20:], {k: v[20:] for k, v in inputs.items()})]
    _, _, split = compute_loss("ppo", [h[0] for h in halves], [h[1] for h in halves], {})
    _, _, whole = compute_loss("ppo", [lp], [inputs], {})
    assert split["loss:sum"] == pytest.approx(whole["loss:sum"], rel=1e-12)


def test_top_k_cross_entropy_sums_over_positions_and_candidates():
    lp = torch.tensor(RNG.uniform(-5, 0, (7, 3)), requires_grad=True)
    weights = torch.tensor(RNG.uniform(-1, 1, (7, 3)))
    total, elementwise, _ = compute_loss("cross_entropy", [lp], [{"weights": weights}], {})
    total.backward()
    assert float(total.detach()) == pytest.approx(float(-(lp * weights).sum().detach()), rel=1e-12)
    assert elementwise[0].shape == (7, 3)
    np.testing.assert_allclose(lp.grad.numpy(), -weights.numpy())


# ---- request checks ------------------------------------------------------------------------------
INFO = {"vocab_size": 100, "max_context": 64}
NO_LOSSES = CustomLossStore(Path(__file__).parent / "no-such-folder")  # requests here name no stored loss


def fb(loss_fn, config=None, **inputs) -> ForwardBackwardIn:
    arrays = {k: np.asarray(v, dtype=np.int64 if k == "target_tokens" else np.float32) for k, v in inputs.items()}
    datum = DatumIn(tokens=np.arange(1, 5, dtype=np.int64), loss_fn_inputs=arrays)
    return ForwardBackwardIn("s:train:0", 1, loss_fn, config or {}, False, [datum])


RL = {"target_tokens": [1, 2, 3, 4], "logprobs": [-1.0] * 4, "advantages": [1.0] * 4}


@pytest.mark.parametrize("request_, message", [
    (fb("stable_reinforce", **RL), "'stable_reinforce' is not supported"),
    (fb("grpo", **RL), "unknown loss_fn 'grpo'"),
    (fb("ppo", {"clip_ratio": 0.2}, **RL), "['clip_ratio'] are not used by 'ppo'"),
    (fb("ppo", {"clip_low_threshold": 1.3}, **RL), "clip_low_threshold=1.3, clip_high_threshold=1.2"),
    (fb("cispo", {"clip_high_threshold": "big"}, **RL), "loss_fn_config['clip_high_threshold'] must be a finite"),
    (fb("dro", {"beta": -1.0}, **RL), "'beta'] must be >= 0"),
    (fb("importance_sampling", {}, target_tokens=[1, 2, 3, 4], logprobs=[-1.0] * 4), "needs loss_fn_inputs['advantages']"),
    (fb("ppo", {}, **{**RL, "advantages": [1.0] * 3}), "datum 0: loss_fn_inputs['advantages'] has 3 entries but target_tokens has 4 entries"),
    (fb("ppo", {}, **{**RL, "target_tokens": [[1, 2]] * 4}), "'ppo' takes [N]"),
    (fb("gspo", {}, **RL, sequence_ratio_mask=[0.0] * 4), "'sequence_ratio_mask'] marks no token"),
    (fb("cross_entropy", {}, target_tokens=[1, 2, 3, 400], weights=[1.0] * 4), "token id 400 at position 3"),
    (fb("cross_entropy", {}, target_tokens=[[1, 2]] * 4, weights=[1.0] * 4), "'weights'] has 4 entries but target_tokens has shape [4, 2]"),
    (fb("dro", {}, **{**RL, "logprobs": [-1.0, float("nan"), 0, 0]}), "'logprobs'] contains NaN"),
    (fb("custom", {"loss_id": "loss-nope"}, **RL), "unknown custom loss_id 'loss-nope'"),
])
def test_bad_requests_are_refused_with_a_message_naming_the_problem(request_, message):
    with pytest.raises(UserError) as e:
        validate_forward_backward(request_, INFO, "s", NO_LOSSES)
    assert message in str(e.value)


def test_stable_reinforce_refusal_lists_the_supported_losses():
    with pytest.raises(UserError) as e:
        validate_forward_backward(fb("stable_reinforce", **RL), INFO, "s", NO_LOSSES)
    for name in ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "custom"):
        assert f"'{name}'" in str(e.value)


def test_a_valid_request_gets_the_defaults_filled_in():
    _, config = validate_forward_backward(fb("cispo", {"clip_high_threshold": 2.0}, **RL), INFO, "s",
                                          NO_LOSSES)
    assert config == {"clip_low_threshold": 0.0, "clip_high_threshold": 2.0}


# ---- the custom-loss interpreter ---------------------------------------------------------------------
def weighted_nll(logprobs, weights, scale):
    loss = -(torch.clamp(logprobs, min=-3.0) * weights).sum() * scale + torch.nn.functional.softplus(logprobs).mean()
    return loss, {"custom/nll:sum": loss, "custom/len:mean": logprobs.shape[0] + logprobs[..., :2].sum() * 0}


def uploaded(fn, ranks) -> CustomLoss:
    handle = trace_loss(fn, ranks, "session")
    inputs = [{"name": i.name, "rank": i.rank} for i in handle.inputs]
    return CustomLoss.parse(handle.name, inputs, encode_graph(handle).model_dump())


def test_an_uploaded_graph_computes_what_the_function_computes():
    loss = uploaded(weighted_nll, {"logprobs": 1, "weights": 1, "scale": 0})
    lps = [torch.tensor(RNG.uniform(-5, 0, n), requires_grad=True) for n in (5, 9)]
    datums = [{"weights": torch.tensor(RNG.uniform(-1, 1, len(lp))), "scale": torch.tensor(0.5)} for lp in lps]
    total, metrics = loss.run(lps, datums)
    total.backward()
    want = [weighted_nll(lp.detach().requires_grad_(), d["weights"], d["scale"]) for lp, d in zip(lps, datums)]
    assert float(total.detach()) == pytest.approx(float(sum(w[0].detach() for w in want)), rel=1e-12)
    assert metrics == {"custom/nll:sum": pytest.approx(float(sum(w[0].detach() for w in want))), "custom/len:mean": 7.0}
    for lp, d in zip(lps, datums):
        x = lp.detach().requires_grad_()
        weighted_nll(x, d["weights"], d["scale"])[0].backward()
        np.testing.assert_allclose(lp.grad.numpy(), x.grad.numpy(), rtol=1e-12)


def graph(*calls, output=("a", {})):
    nodes = [{"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}}]
    nodes += [{"op": op, "name": name, "target": target, "args": args, "kwargs": kwargs}
              for op, name, target, args, kwargs in calls]
    loss, metrics = output
    nodes.append({"op": "output", "name": "output", "target": "output",
                  "args": [{"tuple": [{"ref": loss}, {"dict": {k: {"ref": v} for k, v in metrics.items()}}]}]})
    return {"format": 1, "nodes": nodes}


LP_REF = [{"ref": "logprobs"}]


@pytest.mark.parametrize("calls, output, message", [
    ([("call_function", "a", "os.system", ["echo"], {})], ("a", {}), "'a' (call_function 'os.system') calls a function"),
    ([("call_function", "a", "builtins.eval", ["1"], {})], ("a", {}), "'builtins.eval'"),
    ([("call_function", "a", "torch.load", ["/etc/passwd"], {})], ("a", {}), "'torch.load'"),
    ([("call_module", "a", "linear", LP_REF, {})], ("a", {}), "(call_module 'linear') is not allowed"),
    ([("get_attr", "a", "weight", [], {})], ("a", {}), "(get_attr 'weight') is not allowed"),
    ([("call_method", "a", "mul_", [*LP_REF, 2], {})], ("a", {}), "(call_method 'mul_') calls a tensor method"),
    ([("call_method", "a", "item", LP_REF, {})], ("a", {}), "(call_method 'item')"),
    ([("call_function", "a", "getattr", [*LP_REF, "__class__"], {})], ("a", {}), "may only read the attributes"),
    ([("call_method", "a", "to", [*LP_REF, "cuda:3"], {})], ("a", {}), "may only convert dtypes"),
    ([("call_function", "a", "torch.zeros_like", LP_REF, {"device": "cuda:1"})], ("a", {}), "may not choose a device"),
    ([("call_function", "a", "torch.exp", [{"ref": "b"}], {})], ("a", {}), "refers to 'b', which is not an earlier"),
    ([("call_function", "a", "torch.exp", [{"pickle": "gASV"}], {})], ("a", {}), "cannot read: {'pickle'"),
    ([("call_method", "a", "sum", LP_REF, {})], ("a", {"loss:sum": "a"}), "metrics are named custom/<name>:sum"),
])
def test_graphs_outside_the_allow_list_are_refused_naming_the_node_and_op(calls, output, message):
    with pytest.raises(UserError) as e:
        CustomLoss.parse("evil", [{"name": "logprobs", "rank": 1}], graph(*calls, output=output))
    assert message in str(e.value)


def test_runtime_problems_are_user_errors_naming_the_node():
    not_scalar = CustomLoss.parse("vec", [{"name": "logprobs", "rank": 1}],
                                  graph(("call_function", "a", "torch.exp", LP_REF, {})))
    with pytest.raises(UserError, match="must return a scalar floating-point loss; on datum 0 it returned a "
                                        r"torch.float32 tensor of shape \[4\]"):
        not_scalar.run([torch.zeros(4)], [{}])
    blow_up = CustomLoss.parse("big", [{"name": "logprobs", "rank": 1}], graph(
        ("call_method", "b", "expand", [*LP_REF, 1 << 13, 1 << 12], {}), ("call_method", "a", "sum", [{"ref": "b"}], {})))
    with pytest.raises(UserError, match=r"node 'b' \(expand\) would make 33554432 tensor elements"):
        blow_up.run([torch.zeros(1 << 12)], [{}])
    bad_index = CustomLoss.parse("idx", [{"name": "logprobs", "rank": 1}], graph(
        ("call_function", "b", "operator.getitem", [*LP_REF, 10], {}), ("call_method", "a", "sum", [{"ref": "b"}], {})))
    with pytest.raises(UserError, match=r"node 'b' \(operator.getitem\) failed on datum 0: IndexError"):
        bad_index.run([torch.zeros(3)], [{}])
    for target, args, error in (("operator.pow", [10, 10 ** 9], "OverflowError"),
                                ("operator.mul", ["x", 10 ** 12], "TypeError"),
                                ("operator.mul", [2 ** 60, 2], "TypeError")):
        huge = CustomLoss.parse("huge", [{"name": "logprobs", "rank": 1}], graph(("call_function", "a", target, args, {})))
        with pytest.raises(UserError, match=rf"node 'a' \({target}\) failed on datum 0: {error}"):
            huge.run([torch.zeros(3)], [{}])


def test_a_scalar_input_sent_by_the_sdk_reaches_a_custom_loss_as_a_scalar(tmp_path):
    loss = uploaded(weighted_nll, {"logprobs": 1, "weights": 1, "scale": 0})
    store = CustomLossStore(tmp_path)
    loss_id = asyncio.run(store.add("s", loss))
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 0.0, 1.0],
                                        "scale": types.TensorData(data=[2.0], dtype="float32", shape=[])})
    wire = forward_backward_request_to_proto(types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="custom",
                                                          loss_fn_config={"loss_id": loss_id}),
        model_id="s:train:0", seq_id=1))
    batch, config = validate_forward_backward(decode_forward_backward(wire.SerializeToString(), None), INFO, "s", store)
    assert config == loss.wire
    assert batch["datum_inputs"][0]["scale"].shape == ()
    assert set(batch["inputs"]) == {"target_tokens"}


# ---- the element cap, checked before a node allocates ------------------------------------------------
def test_a_node_that_would_make_a_huge_tensor_is_refused_before_it_allocates():
    def outer(logprobs):
        wide = logprobs.sum().expand(1 << 20)  # a view of 2**20 elements: under the cap, allocates nothing
        return (wide.reshape(-1, 1) * wide.reshape(1, -1)).sum(), {}

    loss = uploaded(outer, {"logprobs": 1})
    # 2**40 float32 elements (4 TiB): had the product been allocated, it would have failed with a
    # RuntimeError from the allocator (or taken the machine's memory), not with this message.
    with pytest.raises(UserError, match=r"node 'mul' \(operator.mul\) would make 1099511627776 tensor elements "
                                        r"on datum 0; the limit is 16777216"):
        loss.run([torch.zeros(3)], [{}])


def selections(logprobs, mask):
    picked = logprobs[mask > 0].sum() + logprobs.masked_select(mask > 0).sum()
    where = torch.where(mask > 0)[0]
    return -picked, {"custom/picked:sum": where.float().sum()}


def test_data_dependent_selections_are_sized_at_their_largest():
    loss = uploaded(selections, {"logprobs": 1, "mask": 1})
    lp, mask = torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    total, metrics = loss.run([lp], [{"mask": mask}])
    assert float(total) == 8.0 and metrics == {"custom/picked:sum": 2.0}

    n = 1 << 13  # a row mask against a column: up to n * n = 2**26 elements, over the cap of 2**24
    cross = CustomLoss.parse("cross", [{"name": "logprobs", "rank": 1}], graph(
        ("call_method", "col", "reshape", [*LP_REF, -1, 1], {}),
        ("call_method", "row", "reshape", [*LP_REF, 1, -1], {}),
        ("call_function", "mask", "operator.gt", [{"ref": "row"}, 0.0], {}),
        ("call_method", "b", "masked_select", [{"ref": "col"}, {"ref": "mask"}], {}),
        ("call_method", "a", "sum", [{"ref": "b"}], {})))
    with pytest.raises(UserError, match=r"node 'b' \(masked_select\) would make 67108864 tensor elements"):
        cross.run([torch.full((n,), -1.0)], [{}])  # refused although this mask selects nothing


# ---- the store of uploaded losses ----------------------------------------------------------------------
SESSION, OTHER = "0f0e0d0c-0b0a-4909-8807-060504030201", "1f1e1d1c-1b1a-4919-8817-161514131211"


def test_uploaded_losses_are_kept_on_disk_and_found_again_by_a_new_store(tmp_path):
    loss = uploaded(weighted_nll, {"logprobs": 1, "weights": 1, "scale": 0})
    loss_id = asyncio.run(CustomLossStore(tmp_path).add(SESSION, loss))
    # in its session's folder, written in one step: no temp file left
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == [SESSION, f"{SESSION}/{loss_id}.json"]

    restarted = CustomLossStore(tmp_path)  # what a restarted server has: nothing in memory
    assert restarted._read(loss_id, OTHER) is None  # another session's request does not find it on disk
    found = restarted.find(loss_id, SESSION)
    lp, datum = torch.tensor([-0.5, -4.0, -1.0]), {"weights": torch.tensor([1.0, 2.0, 0.5]), "scale": torch.tensor(2.0)}
    assert float(found.run([lp], [datum])[0]) == float(loss.run([lp], [datum])[0])
    assert restarted.find(loss_id, SESSION) is found  # read from disk once, then kept in memory
    with pytest.raises(UserError, match="belongs to another session"):
        restarted.find(loss_id, OTHER)
    for unknown in ("loss-" + "0" * 32, "../" + loss_id, str(tmp_path / loss_id)):
        with pytest.raises(UserError, match="unknown custom loss_id"):
            restarted.find(unknown, SESSION)

    legacy = CustomLossStore(tmp_path / "legacy")  # a file of an earlier version: <folder>/<loss_id>.json
    old_id = asyncio.run(legacy.add("not-a-registry-session-id", loss))
    assert (tmp_path / "legacy" / f"{old_id}.json").is_file()
    assert CustomLossStore(tmp_path / "legacy")._read(old_id, SESSION).session_id == "not-a-registry-session-id"
    moved = (tmp_path / "legacy" / f"{loss_id}.json")  # a registry session's flat file moves to its folder
    moved.write_bytes((tmp_path / SESSION / f"{loss_id}.json").read_bytes())
    assert CustomLossStore(tmp_path / "legacy").find(loss_id, SESSION).name == loss.name
    assert not moved.exists() and (tmp_path / "legacy" / SESSION / f"{loss_id}.json").is_file()


def test_the_losses_of_sessions_that_are_gone_are_deleted(tmp_path):
    store = CustomLossStore(tmp_path)
    loss = uploaded(weighted_nll, {"logprobs": 1, "weights": 1, "scale": 0})
    mine, theirs = (asyncio.run(store.add(session, loss)) for session in (SESSION, OTHER))
    asyncio.run(store.forget_sessions({SESSION, "2f2e2d2c-2b2a-4929-8827-262524232221"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [OTHER]
    for where in (store, CustomLossStore(tmp_path)):  # neither in memory nor on disk
        with pytest.raises(UserError, match="unknown custom loss_id"):
            where.find(mine, SESSION)
        assert where.find(theirs, OTHER).name == loss.name


def test_prefetch_reads_a_stored_loss_off_the_event_loop_so_find_never_touches_the_disk(tmp_path, monkeypatch):
    loss_id = asyncio.run(CustomLossStore(tmp_path).add("s", uploaded(weighted_nll, {"logprobs": 1, "weights": 1,
                                                                                      "scale": 0})))
    restarted = CustomLossStore(tmp_path)
    reads = []
    real_read = CustomLossStore._read

    def read(self, name, session_id):
        reads.append(threading.get_ident())
        return real_read(self, name, session_id)

    monkeypatch.setattr(CustomLossStore, "_read", read)

    async def handler_turn():
        await restarted.prefetch(loss_id, "s")
        await restarted.prefetch("loss-" + "0" * 32, "s")  # unknown: nothing to read, nothing raised here
        await restarted.prefetch(None, "s")  # a request that names no loss as text
        return threading.get_ident(), restarted.find(loss_id, "s")

    loop_thread, found = asyncio.run(handler_turn())
    assert len(reads) == 2 and loop_thread not in reads  # both files looked up in a worker thread
    assert found is restarted.find(loss_id, "s") and len(reads) == 2  # find answered from memory


def test_a_stored_loss_is_checked_against_the_allow_lists_again_when_read_back(tmp_path):
    loss_id = asyncio.run(CustomLossStore(tmp_path).add("s", uploaded(weighted_nll, {"logprobs": 1, "weights": 1,
                                                                                      "scale": 0})))
    file = tmp_path / f"{loss_id}.json"
    record = json.loads(file.read_text())
    record["graph"]["nodes"][1] = {"op": "call_function", "name": "x", "target": "os.system", "args": ["true"],
                                   "kwargs": {}}
    file.write_text(json.dumps(record))
    with pytest.raises(UserError, match="'os.system'"):
        CustomLossStore(tmp_path).find(loss_id, "s")
    file.write_text("{not json")
    with pytest.raises(UserError, match="could not be read back"):
        CustomLossStore(tmp_path).find(loss_id, "s")


def test_the_in_memory_losses_forget_the_least_recently_used_first():
    recent = LruDict(2)
    recent["a"], recent["b"] = 1, 2
    assert recent["a"] == 1  # reading "a" makes "b" the least recently used
    recent["c"] = 3
    assert list(recent) == ["a", "c"]
    assert recent.get("a") == 1 and recent.get("b") is None
    recent["d"] = 4
    assert list(recent) == ["a", "d"]
