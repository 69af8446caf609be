"""Server-side custom losses: an uploaded torch.fx graph, rebuilt from allow-lists, run per datum.

`ServiceClient.create_custom_loss(fn, input_ranks)` traces `fn(logprobs, *inputs) ->
(loss, metrics)` with torch.fx and uploads the graph as plain data (wire protocol §7): nodes
`{op, name, target, args, kwargs}` in execution order. Nothing in it is executable as sent.
`CustomLoss.parse` rebuilds the computation only from the allow-lists below (torch, math and
operator functions, tensor methods that neither mutate nor leave torch, a few tensor
attributes) and rejects anything else with a user error that names the node and the op; the
graph is then evaluated by a small interpreter, never compiled or imported.

`run` evaluates it once per datum (that datum's logprobs, then the inputs it names), sums the
losses and reduces metrics by suffix (`:sum` adds, `:mean` averages over datums), as the SDK's
client-side runner does. The workers receive the loss as its wire form and parse it again.

No node may make tensors of more elements than a cap (`MIN_ELEMENT_CAP`, or 16x the datum's
logprobs). Each call is sized before it runs, by running it first on "meta" tensors (shapes,
strides and dtypes, no data), so a graph that asks for a huge tensor is refused before anything
is allocated; a call that fails there is refused with that error and never run for real.
Selections whose size depends on the data (boolean masks, `masked_select`, one-argument `where`)
are sized at their largest, as if every mask were all True.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name

from engine.messages import UserError

Tensor = torch.Tensor

MAX_NODES = 4096
MAX_INPUTS = 16
MIN_ELEMENT_CAP = 1 << 24  # largest tensor a node may produce: this, or 16x the datum's logprobs
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")


def _functions(module: Any, names: str) -> dict[str, Callable]:
    """Wire name -> function, under the module's public name and under torch.fx's qualified
    name (e.g. F.logsigmoid is traced as `torch._C._nn.log_sigmoid`)."""
    table = {}
    for name in names.split():
        fn = getattr(module, name)
        table[f"{module.__name__}.{name}"] = fn
        table[_get_qualified_name(fn).replace("_operator.", "operator.", 1)] = fn
    return table


FUNCTIONS: dict[str, Callable] = {
    **_functions(torch, """abs absolute neg negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square pow
        sigmoid tanh relu sign sgn clamp clip clamp_min clamp_max minimum maximum fmin fmax min max amin amax
        sum nansum mean nanmean prod cumsum logsumexp logaddexp softmax log_softmax where stack cat concat
        zeros_like ones_like full_like tensor add sub subtract mul multiply div divide true_divide reciprocal
        eq ne lt le gt ge logical_and logical_or logical_not logical_xor isfinite isnan isinf nan_to_num
        gather squeeze unsqueeze reshape flatten transpose numel var std lerp floor ceil round trunc detach
        masked_fill any all count_nonzero argmax argmin topk sort dot"""),
    **_functions(F, """logsigmoid softplus relu sigmoid tanh log_softmax softmax silu gelu elu leaky_relu
        mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy_with_logits kl_div nll_loss
        cross_entropy normalize"""),
    **_functions(math, "exp log log1p expm1 sqrt pow fabs floor ceil tanh isfinite isnan isinf"),
    **_functions(operator, """add sub mul truediv floordiv mod pow neg pos abs getitem eq ne lt le gt ge
        and_ or_ xor invert"""),
}
# Tensor methods: pure functions of the tensor (no in-place `_` variants, nothing that leaves torch).
METHODS = frozenset("""abs neg exp expm1 log log1p log2 sqrt rsqrt square pow sigmoid tanh relu sign clamp
    clamp_min clamp_max clip sum nansum mean prod cumsum max min amax amin logsumexp softmax log_softmax
    detach float double to type_as view view_as reshape reshape_as flatten squeeze unsqueeze transpose
    permute t gather masked_fill where size dim numel mul add sub div true_divide reciprocal eq ne lt le gt ge
    logical_and logical_or logical_not any all var std nan_to_num isfinite isnan isinf expand expand_as
    contiguous clone long int bool argmax argmin count_nonzero floor ceil round lerp minimum maximum norm dot
    sort topk select narrow index_select masked_select""".split())
ATTRIBUTES = frozenset({"shape", "dtype", "ndim", "T", "mT", "device"})
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format}


@dataclass(frozen=True)
class Ref:
    """An earlier node's value."""

    name: str


class RuntimeDevice:
    """A device argument: always the device the datum's logprobs live on."""


RUNTIME_DEVICE = RuntimeDevice()


@dataclass(frozen=True)
class Step:
    name: str
    op: str  # "call_function" | "call_method"
    target: str  # the wire name, for messages
    args: tuple
    kwargs: dict[str, Any]

    def call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.op == "call_method":
            receiver = args[0]
            if not isinstance(receiver, Tensor):
                raise TypeError(f"method {self.target!r} is only allowed on tensors, not {type(receiver).__name__}")
            return getattr(receiver, self.target)(*args[1:], **kwargs)
        if self.target == "getattr":
            if not isinstance(args[0], Tensor):
                raise TypeError(f"attributes can only be read from tensors, not {type(args[0]).__name__}")
            return getattr(args[0], args[1])
        if self.target in PYTHON_ARITHMETIC and not any(isinstance(a, Tensor) for a in args):
            args = _modest_numbers(self.target, args)
        return FUNCTIONS[self.target](*args, **kwargs)

    def elements_made(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """How many tensor elements the call would make, found without allocating them: the call
        runs on meta copies of its tensors, and raises there what it would raise for real. A call
        that takes no tensor makes none, or only from values written in the request."""
        if not _has_tensor((args, kwargs)):
            return 0
        meta_args, meta_kwargs = _on_meta(args), _on_meta(kwargs)
        with torch.no_grad():
            try:
                return _elements(self.call(meta_args, meta_kwargs))
            except NotImplementedError:  # no meta kernel: the result's size depends on the data
                return self._largest_selection(meta_args, meta_kwargs)

    def _largest_selection(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """Elements of a data-dependent selection at its largest (every mask all True)."""
        function = FUNCTIONS.get(self.target) if self.op == "call_function" else None
        if function is operator.getitem and len(args) == 2 and isinstance(args[0], Tensor):
            return _elements(args[0][_all_true_index(args[1])])
        if self.op == "call_method" and self.target == "masked_select":
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            if isinstance(mask, Tensor):
                return math.prod(torch.broadcast_shapes(args[0].shape, mask.shape))
        if function is torch.where and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            return max(1, args[0].ndim) * args[0].numel()  # one index tensor per dimension
        raise TypeError("the size of its result cannot be known before it runs; custom losses may select with "
                        "boolean masks only by indexing, masked_select or one-argument torch.where")


# operator functions that, on plain Python values, could build huge ints or sequences
PYTHON_ARITHMETIC = frozenset(f"operator.{n}" for n in "add sub mul truediv floordiv mod pow neg pos abs".split())
MAX_PYTHON_NUMBER = 2 ** 53


def _modest_numbers(target: str, args: tuple) -> tuple:
    """Python-level arithmetic (on shapes, say) is allowed on modest numbers only; powers in floats."""
    for a in args:
        if not isinstance(a, (bool, int, float)) or abs(a) > MAX_PYTHON_NUMBER:
            raise TypeError(f"{target} on plain Python values takes numbers up to 2**53, got {a!r:.60}")
    return tuple(float(a) for a in args) if target == "operator.pow" else args


@dataclass(frozen=True)
class CustomLoss:
    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank); logprobs first
    steps: tuple[Step, ...]
    loss: Ref
    metrics: dict[str, Ref]
    wire: dict[str, Any]  # what was uploaded: {"name", "inputs", "graph"}

    @classmethod
    def parse(cls, name: Any, inputs: Any, graph: Any) -> "CustomLoss":
        """Rebuild an uploaded loss, or raise UserError saying which node is not allowed and why."""
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise UserError("custom loss name must be a string of 1 to 128 characters")
        declared = _parse_inputs(name, inputs)
        nodes = _graph_nodes(name, graph)
        parser = _Parser(name, declared)
        for node in nodes:
            parser.add(node)
        loss, metrics = parser.result()
        wire = {"name": name, "inputs": [{"name": n, "rank": r} for n, r in declared], "graph": graph}
        return cls(name, declared, tuple(parser.steps), loss, metrics, wire)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> "CustomLoss":
        return cls.parse(wire.get("name"), wire.get("inputs"), wire.get("graph"))

    def run(self, logprobs: list[Tensor], inputs: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """(sum of the per-datum losses, metrics reduced by suffix)."""
        total: Tensor | None = None
        sums: dict[str, float] = {}
        for i, (lp, datum_inputs) in enumerate(zip(logprobs, inputs)):
            # Rank-0 inputs may arrive as one-element arrays (shared-memory transport keeps ndim >= 1).
            values = [datum_inputs[n].reshape(()) if rank == 0 else datum_inputs[n] for n, rank in self.inputs[1:]]
            loss, metrics = self._evaluate(i, [lp, *values])
            total = loss if total is None else total + loss
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        reduced = {k: v / len(logprobs) if k.endswith(":mean") else v for k, v in sums.items()}
        return total, reduced

    def _evaluate(self, datum: int, values: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        env: dict[str, Any] = dict(zip((n for n, _ in self.inputs), values))
        device, cap = values[0].device, max(MIN_ELEMENT_CAP, 16 * values[0].numel())
        for step in self.steps:
            try:
                args, kwargs = _resolve(step.args, env, device), _resolve(step.kwargs, env, device)
                elements = step.elements_made(args, kwargs)
                if elements > cap:
                    raise UserError(f"custom loss {self.name!r}: node {step.name!r} ({step.target}) would make "
                                    f"{elements} tensor elements on datum {datum}; the limit is {cap}")
                value = step.call(args, kwargs)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the user's graph is the user's error
                raise UserError(f"custom loss {self.name!r}: node {step.name!r} ({step.target}) failed on "
                                f"datum {datum}: {type(e).__name__}: {e}") from None
            env[step.name] = value
        loss = env[self.loss.name]
        if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.is_floating_point():
            raise UserError(f"custom loss {self.name!r} must return a scalar floating-point loss; on datum {datum} "
                            f"it returned {_describe(loss)}")
        return loss, {key: _metric_value(self.name, key, env[ref.name], datum) for key, ref in self.metrics.items()}


def _parse_inputs(name: str, inputs: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS:
        raise UserError(f"custom loss {name!r}: inputs must be a list of 1 to {MAX_INPUTS} {{name, rank}} objects")
    declared = []
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item.get("rank") not in (0, 1, 2):
            raise UserError(f"custom loss {name!r}: each input must be {{'name': str, 'rank': 0, 1 or 2}}, got {item!r}")
        if not INPUT_NAME.fullmatch(item["name"]):
            raise UserError(f"custom loss {name!r}: input name {item['name']!r} must be lowercase letters, digits, '_'")
        declared.append((item["name"], item["rank"]))
    if declared[0][0] != "logprobs" or declared[0][1] not in (1, 2):
        raise UserError(f"custom loss {name!r}: the first input must be logprobs with rank 1 or 2, got {declared[0]}")
    if len({n for n, _ in declared}) != len(declared):
        raise UserError(f"custom loss {name!r}: input names must be distinct, got {[n for n, _ in declared]}")
    return tuple(declared)


def _graph_nodes(name: str, graph: Any) -> list[dict[str, Any]]:
    if not isinstance(graph, dict) or graph.get("format") != 1 or not isinstance(graph.get("nodes"), list):
        raise UserError(f"custom loss {name!r}: graph must be {{'format': 1, 'nodes': [...]}}")
    nodes = graph["nodes"]
    if not 0 < len(nodes) <= MAX_NODES:
        raise UserError(f"custom loss {name!r}: a graph has 1 to {MAX_NODES} nodes, this one has {len(nodes)}")
    for node in nodes:
        if not isinstance(node, dict) or not all(isinstance(node.get(k), str) for k in ("op", "name", "target")):
            raise UserError(f"custom loss {name!r}: each node needs string 'op', 'name' and 'target', got {node!r}")
    return nodes


class _Parser:
    """Checks nodes one by one, in order, and turns the allowed ones into `Step`s."""

    def __init__(self, loss_name: str, inputs: tuple[tuple[str, int], ...]) -> None:
        self.loss_name = loss_name
        self.inputs = inputs
        self.defined: set[str] = set()
        self.placeholders = 0
        self.steps: list[Step] = []
        self.output: Any = None

    def fail(self, node: dict[str, Any], problem: str) -> UserError:
        return UserError(f"custom loss {self.loss_name!r}: node {node['name']!r} ({node['op']} {node['target']!r}) "
                         f"{problem}")

    def add(self, node: dict[str, Any]) -> None:
        if self.output is not None:
            raise self.fail(node, "comes after the output node")
        if node["name"] in self.defined:
            raise self.fail(node, "reuses a name")
        op = node["op"]
        if op == "placeholder":
            self._placeholder(node)
        elif op in ("call_function", "call_method"):
            self.steps.append(self._step(node))
        elif op == "output":
            self.output = self._output(node)
            return
        else:
            raise self.fail(node, f"is not allowed: custom losses may only call allowed functions and tensor "
                                  f"methods ({op} nodes read modules or captured tensors)")
        self.defined.add(node["name"])

    def _placeholder(self, node: dict[str, Any]) -> None:
        if self.steps or self.placeholders >= len(self.inputs) or node["target"] != self.inputs[self.placeholders][0]:
            expected = [n for n, _ in self.inputs]
            raise self.fail(node, f"does not match the declared inputs {expected} (in order, before any call)")
        if node["name"] != node["target"]:
            raise self.fail(node, "must be named after its input")
        self.placeholders += 1

    def _step(self, node: dict[str, Any]) -> Step:
        op, target = node["op"], node["target"]
        if op == "call_function" and target != "getattr" and target not in FUNCTIONS:
            raise self.fail(node, "calls a function that is not allowed here; allowed are common torch, "
                                  "torch.nn.functional, math and operator functions")
        if op == "call_method" and target not in METHODS:
            raise self.fail(node, "calls a tensor method that is not allowed here (in-place methods and "
                                  "methods that leave torch are never allowed)")
        args, kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise self.fail(node, "needs 'args' as a list and 'kwargs' as an object")
        step = Step(node["name"], op, target, tuple(self._decode(node, a) for a in args),
                    {k: self._decode(node, v) for k, v in kwargs.items()})
        self._check_arguments(node, step)
        return step

    def _check_arguments(self, node: dict[str, Any], step: Step) -> None:
        if step.op == "call_method" and not (step.args and isinstance(step.args[0], Ref)):
            raise self.fail(node, "must be called on an earlier node's value")
        if step.target == "getattr" and not (len(step.args) == 2 and isinstance(step.args[0], Ref)
                                             and isinstance(step.args[1], str) and step.args[1] in ATTRIBUTES
                                             and not step.kwargs):
            raise self.fail(node, f"may only read the attributes {sorted(ATTRIBUTES)} of a tensor")
        if step.target == "to" and any(isinstance(a, str) for a in (*step.args, *step.kwargs.values())):
            raise self.fail(node, "may only convert dtypes (devices are chosen by the server)")
        if isinstance(step.kwargs.get("device"), str):
            raise self.fail(node, "may not choose a device (devices are chosen by the server)")

    def _output(self, node: dict[str, Any]) -> tuple[Ref, dict[str, Ref]]:
        if self.placeholders != len(self.inputs):
            raise self.fail(node, f"comes before all declared inputs {[n for n, _ in self.inputs]} were read")
        args = node.get("args")
        value = self._decode(node, args[0]) if isinstance(args, list) and len(args) == 1 else None
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], Ref)
                and isinstance(value[1], dict) and all(isinstance(v, Ref) for v in value[1].values())):
            raise self.fail(node, "must return (loss, {metric name: value}) made of graph values")
        for key in value[1]:
            if not METRIC_KEY.fullmatch(key):
                raise self.fail(node, f"has metric {key!r}; metrics are named custom/<name>:sum or custom/<name>:mean")
        return value[0], dict(value[1])

    def result(self) -> tuple[Ref, dict[str, Ref]]:
        if self.output is None:
            raise UserError(f"custom loss {self.loss_name!r}: the graph has no output node")
        return self.output

    def _decode(self, node: dict[str, Any], arg: Any) -> Any:
        if arg is None or isinstance(arg, (bool, int, float, str)):
            return arg
        if isinstance(arg, list):
            return [self._decode(node, a) for a in arg]
        if not (isinstance(arg, dict) and len(arg) == 1):
            raise self.fail(node, f"has an argument this server cannot read: {arg!r}")
        (kind, value), = arg.items()
        if kind == "ref":
            if value not in self.defined:
                raise self.fail(node, f"refers to {value!r}, which is not an earlier node")
            return Ref(value)
        if kind == "tuple" and isinstance(value, list):
            return tuple(self._decode(node, a) for a in value)
        if kind == "dict" and isinstance(value, dict):
            return {k: self._decode(node, v) for k, v in value.items()}
        if kind == "slice" and isinstance(value, list) and len(value) == 3:
            return slice(*(self._decode(node, a) for a in value))
        if kind == "ellipsis" and value is True:
            return Ellipsis
        if kind == "float" and value in ("inf", "-inf", "nan"):
            return float(value)
        if kind == "device":
            return RUNTIME_DEVICE
        for table_kind, table in (("dtype", DTYPES), ("layout", LAYOUTS), ("memory_format", MEMORY_FORMATS)):
            if kind == table_kind and value in table:
                return table[value]
        raise self.fail(node, f"has an argument this server cannot read: {arg!r}")


def _resolve(arg: Any, env: dict[str, Any], device: torch.device) -> Any:
    if isinstance(arg, Ref):
        return env[arg.name]
    if arg is RUNTIME_DEVICE:
        return device
    if isinstance(arg, (list, tuple)):
        return type(arg)(_resolve(a, env, device) for a in arg)
    if isinstance(arg, dict):
        return {k: _resolve(v, env, device) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_resolve(arg.start, env, device), _resolve(arg.stop, env, device), _resolve(arg.step, env, device))
    return arg


def _has_tensor(arg: Any) -> bool:
    if isinstance(arg, Tensor):
        return True
    if isinstance(arg, (list, tuple)):
        return any(_has_tensor(a) for a in arg)
    if isinstance(arg, dict):
        return any(_has_tensor(a) for a in arg.values())
    return False


META = torch.device("meta")


def _on_meta(arg: Any) -> Any:
    """`arg` with every tensor replaced by a meta tensor of the same shape, strides and dtype, and
    every device by the meta device: what a call can be sized with, allocating nothing."""
    if isinstance(arg, Tensor):
        return torch.empty_strided(arg.shape, arg.stride(), dtype=arg.dtype, device=META)
    if isinstance(arg, torch.device):
        return META
    if isinstance(arg, (list, tuple)) and not isinstance(arg, torch.Size):
        return type(arg)(_on_meta(a) for a in arg)
    if isinstance(arg, dict):
        return {k: _on_meta(v) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_on_meta(arg.start), _on_meta(arg.stop), _on_meta(arg.step))
    return arg


def _elements(value: Any) -> int:
    """Tensor elements in a call's result (a tensor, or tensors in a tuple such as topk's)."""
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_elements(v) for v in value)
    return 0


def _all_true_index(index: Any) -> Any:
    """A getitem index with each boolean mask replaced by the integer indexes an all-True mask of
    its shape selects (its largest selection), so the result can be sized on meta."""
    parts = index if isinstance(index, tuple) else (index,)
    replaced: list[Any] = []
    for part in parts:
        if isinstance(part, Tensor) and part.dtype == torch.bool:
            if part.ndim == 0:
                replaced.append(None)  # a scalar True adds a dimension of size 1
            else:
                replaced.extend([torch.empty(part.numel(), dtype=torch.int64, device=META)] * part.ndim)
        else:
            replaced.append(part)
    return tuple(replaced)


def _metric_value(loss_name: str, key: str, value: Any, datum: int) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach())
    raise UserError(f"custom loss {loss_name!r}: metric {key!r} must be a one-element tensor; on datum {datum} "
                    f"it is {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
