"""Capture and replay of the output cotangent (Functional-SAM, SPEC §2).

Functional-SAM's second gradient is ĝ = J(θ+e)ᵀ c0: the vector-Jacobian
product at the perturbed point of the model output with the loss cotangent
c0 = ∂ℓ/∂z taken at θ (Singh et al., ICML 2025, arXiv 2502.02407, §4).
With gradient accumulation every micro-batch has its own c0, so pass 1
records one cotangent per micro-batch and pass 2 replays them in order.

This module was ``fsam_kernels.functional`` before; that name still imports
(:mod:`fsam_kernels.functional` re-exports every name of this one).

Example (manual two-phase loop with accumulation)::

    rec = CotangentRecorder()
    opt.zero_grad()
    for x, y in micro_batches:                 # pass 1 at θ
        z = rec.capture(model(x))              # registers hooks on z
        loss_fn(z, y).backward()               # c0 recorded by the hooks
    opt.first_step()                           # θ -> θ + e
    opt.zero_grad()
    for x, y in micro_batches:                 # pass 2 at θ + e, same order
        rec.replay(model(x))                   # backward of z1 with its c0
    opt.second_step()                          # restore θ, AdamW
"""
from __future__ import annotations

import sys
import warnings
import weakref
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["CotangentRecorder", "flatten_output", "select_output", "is_model_output"]


# -- recorders tied to an optimizer's steps ---------------------------------------
#: optimizer -> the recorders made for it (HeadRecorder, CotangentRecorder(optimizer=)),
#: both held weakly: neither keeps the other alive, and the optimizer's own
#: __dict__ (pickled, deep-copied) holds nothing of it
_REGISTRY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def register_recorder(optimizer: Any, recorder: Any) -> None:
    """Make ``optimizer.second_step()`` ask ``recorder.pending()`` (the number
    of records of the current step not yet replayed) and refuse the step
    while it is not 0 (:func:`check_unreplayed`)."""
    _REGISTRY.setdefault(optimizer, weakref.WeakSet()).add(recorder)
    # a plain flag second_step() reads before calling check_unreplayed, so an
    # optimizer without recorders or marks keeps a compiled second_step whole
    optimizer._step_vars["recorders"] = True


#: replays by recorders bound to no optimizer (CotangentRecorder() without
#: ``optimizer=``): FunctionalSAM.second_step compares it with its value at
#: first_step, since such a replay cannot say which optimizer it served
_UNBOUND_REPLAYS = [0]


def note_replay(optimizer: Any) -> None:
    """Count one pass-2 backward with recorded cotangents (J(θ+e)ᵀ c0) for
    ``optimizer`` (None: a recorder bound to no optimizer).
    ``FunctionalSAM.second_step()`` refuses a step with none (its pass 2 would
    be plain SAM's gradient)."""
    if optimizer is None:
        _UNBOUND_REPLAYS[0] += 1
        return
    sv = getattr(optimizer, "_step_vars", None)
    if sv is not None:
        sv["functional_replays"] = sv.get("functional_replays", 0) + 1


def check_replayed(optimizer: Any) -> None:
    """Warn (``UserWarning``, once per optimizer) at the start of a
    FunctionalSAM ``second_step()`` when no pass-2 backward went through the
    library's cotangent mechanisms since ``first_step()``: no
    CotangentRecorder / HeadRecorder replay, no ``mark_output`` in pass 2, no
    ``step(closure)``. Then pass 2 was either the user's own
    ``z1.backward(c0)`` (SPEC §2; correct) or an ordinary
    ``loss.backward()``, which gives plain SAM's gradient; the two cannot be
    told apart, so this warns rather than raises."""
    sv = optimizer._step_vars
    if sv.get("functional_replays", 0) or _UNBOUND_REPLAYS[0] != sv.get("unbound_replays_at") \
            or sv.get("warned_no_replay"):
        return
    sv["warned_no_replay"] = True
    warnings.warn(
        "FunctionalSAM.second_step: pass 2 used no recorded cotangent (no "
        "CotangentRecorder/HeadRecorder replay(), no mark_output() in pass 2, no "
        "step(closure)). If pass 2 was an ordinary loss.backward(), this step is plain SAM, "
        "not Functional-SAM: capture the pass-1 output (or mark_output it) and replay it in "
        "pass 2. If you back-propagated the pass-1 cotangent yourself (z1.backward(c0)), "
        "ignore this (warned once per optimizer)", UserWarning, stacklevel=3)


def step_generation(optimizer: Any) -> int:
    """The number of successful ``first_step()`` calls of ``optimizer``: a
    record made in pass 1 at generation g belongs to the step whose
    ``first_step()`` makes it g + 1, and may be replayed only then."""
    return optimizer._step_vars.get("generation", 0)


@torch.compiler.disable     # bookkeeping on host objects: eager also in a compiled second_step
def held_records(optimizer: Any) -> int:
    """Records held by the recorders registered with ``optimizer`` (any step)."""
    return sum(len(r) for r in list(_REGISTRY.get(optimizer, ())))


def check_unreplayed(optimizer: Any) -> None:
    """Called at the start of ``second_step()``, before anything changes:
    ``RuntimeError`` when a registered recorder still holds records of this
    step (captured in its pass 1, not replayed in pass 2), or when outputs
    marked with ``mark_output`` in pass 1 were not marked in pass 2: the
    update would silently lack their micro-batches' pass-2 gradient."""
    n_rec = sum(r.pending() for r in list(_REGISTRY.get(optimizer, ())))
    n_marks = 0
    if getattr(optimizer, "_functional", False):
        from . import _closure
        n_marks = _closure.marks_count(optimizer)
    if n_rec or n_marks:
        what = []
        if n_rec:
            what.append(f"{n_rec} record(s) captured in pass 1 were not replayed in pass 2")
        if n_marks:
            what.append(f"{n_marks} output(s) marked with mark_output() in pass 1 were not "
                        "marked in pass 2")
        raise RuntimeError(
            "second_step: " + "; ".join(what) + "; replay every pass-1 micro-batch (same "
            "count, same order) before second_step(). Nothing was changed: the step is "
            "still pending (replay the rest, or call optimizer.restore() and the "
            "recorder's clear() to abandon it)")


def _stale_capture_error(cls: str, n: int, why: str) -> RuntimeError:
    return RuntimeError(
        f"{cls}.capture: {n} record(s) of an earlier pass 1 were never replayed ({why}); "
        "replaying them now would use another step's cotangents. Replay every pass-1 "
        "micro-batch before the next pass 1, or call clear() to drop them")


def _check_replay_generation(cls: str, optimizer: Any, gen: int) -> None:
    """``RuntimeError`` unless a first_step() is pending on ``optimizer`` and
    it is the one that followed the pass 1 at generation ``gen``."""
    if getattr(optimizer, "_perturbed", None) is None:
        raise RuntimeError(f"{cls}.replay: no first_step() is pending on the optimizer; "
                           "replay between first_step() and second_step()")
    now = step_generation(optimizer)
    if gen + 1 != now:
        raise RuntimeError(
            f"{cls}.replay: the oldest record was made in the pass 1 of an earlier step "
            f"(step generation {gen}, the pending first_step() is generation {now - 1}'s); "
            "its cotangent belongs to another θ. Call clear() and capture again")

#: what ``output=`` may be: None (the default rule), a key or attribute name,
#: a tuple/list index, or a callable returning the model output
Selector = Union[None, str, int, Callable[[Any], Any]]

_RULE = ("Functional-SAM takes the cotangent on the model output only (the logits): "
         "return (logits, loss) from the closure, or select the output with "
         "FunctionalSAM(..., output='logits') / CotangentRecorder(output='logits') "
         "(a key, an index or a callable)")


def is_model_output(obj: Any) -> bool:
    """True for a Hugging Face ``transformers.utils.ModelOutput`` (detected
    without importing transformers when it is not loaded already)."""
    if isinstance(obj, Tensor) or not isinstance(obj, dict):
        return False
    tf = sys.modules.get("transformers")
    mo = getattr(getattr(tf, "utils", None), "ModelOutput", None) if tf is not None else None
    if mo is not None and isinstance(obj, mo):
        return True
    return any(c.__name__ == "ModelOutput" and c.__module__.startswith("transformers")
               for c in type(obj).__mro__)


def _logits_of(obj: Any) -> Optional[Tensor]:
    """``obj.logits`` when ``obj`` is a ModelOutput or another non-container
    object carrying a ``logits`` tensor, else None."""
    if isinstance(obj, (Tensor, tuple, list)):
        return None
    if is_model_output(obj):
        lg = obj.get("logits")
        return lg if isinstance(lg, Tensor) else None
    if isinstance(obj, dict):
        return None
    lg = getattr(obj, "logits", None)
    return lg if isinstance(lg, Tensor) else None


def check_selector(output: Selector, *, argname: str = "output") -> None:
    """``TypeError`` naming ``argname`` unless ``output`` is None, a str, an
    int or a callable."""
    if output is None or isinstance(output, str) or callable(output):
        return
    if isinstance(output, int) and not isinstance(output, bool):
        return
    raise TypeError(f"{argname}: expected None, a key or attribute name (str), an index "
                    f"(int) or a callable returning the model output; got "
                    f"{type(output).__name__} {output!r}")


def select_output(output: Any, selector: Selector = None, *, argname: str = "output",
                  selector_name: str = "output=") -> Any:
    """The part of ``output`` that Functional-SAM treats as the model output z.

    The rule (the same in ``FunctionalSAM.step(closure)`` and in
    :class:`CotangentRecorder`):

    1. ``selector`` given: a str is a key (dicts, ModelOutputs) or else an
       attribute name, an int indexes a tuple/list, a callable is called
       with the output and returns the model output;
    2. otherwise a Hugging Face ``ModelOutput`` (or any non-container object
       with a ``logits`` tensor attribute) stands for its ``.logits``;
    3. otherwise the output itself (a tensor, or a tuple/list/dict of them).

    Raises ``KeyError``/``IndexError``/``TypeError`` naming ``selector_name``
    when the selector does not fit the output.
    """
    if selector is None:
        lg = _logits_of(output)
        return output if lg is None else lg
    if isinstance(selector, str):
        if isinstance(output, dict):
            if selector not in output:
                raise KeyError(f"{selector_name} {selector!r}: {argname} has no such key "
                               f"(keys: {list(output)})")
            return output[selector]
        if not hasattr(output, selector):
            raise KeyError(f"{selector_name} {selector!r}: {argname} "
                           f"({type(output).__name__}) has no such attribute")
        return getattr(output, selector)
    if isinstance(selector, int) and not isinstance(selector, bool):
        if not isinstance(output, (tuple, list)):
            raise TypeError(f"{selector_name} {selector!r}: an index selects from a tuple/list "
                            f"output, but {argname} is a {type(output).__name__}")
        if not -len(output) <= selector < len(output):
            raise IndexError(f"{selector_name} {selector!r}: {argname} has {len(output)} items")
        return output[selector]
    check_selector(selector, argname=selector_name.rstrip("="))
    return selector(output)


def _is_head_output(obj: Any) -> bool:
    heads = sys.modules.get("fsam_kernels.heads.linear_ce")
    return heads is not None and heads.is_head_output(obj)


def _head_in_output_msg(key: str) -> str:
    return (f"{key} is the output of a FusedLinearCrossEntropy head, here among other "
            "outputs (or given to a CotangentRecorder). The fused head is recorded by "
            "HeadRecorder, one head call per record: a FunctionalSAM.step closure "
            "calls the head once and returns (out, out.loss); to use several batches "
            "in one closure, concatenate their hidden states and labels (torch.cat) "
            "into one head call (with reduction='sum' and your own scaling where the "
            "batches must be weighted); for several head calls per step use a "
            "hand-written loop with HeadRecorder.capture()/replay() per call")


def flatten_output(output: Any, *, argname: str = "output") -> List[Tuple[str, Tensor]]:
    """Flatten a model output into ``[(key, tensor), ...]``.

    ``output`` may be a tensor, a tuple/list of tensors or a dict of tensors
    (nested one level or more). A Hugging Face ``ModelOutput`` (or another
    object with a ``logits`` tensor attribute) stands for its ``.logits``
    (rule 2 of :func:`select_output`). Non-tensor leaves are rejected with a
    ``TypeError`` naming ``argname`` (a transformers cache gets the hint
    ``use_cache=False``).
    """
    items: List[Tuple[str, Tensor]] = []

    def walk(obj, key):
        if isinstance(obj, Tensor):
            items.append((key, obj))
        elif key != argname and _is_head_output(obj):
            raise ValueError(_head_in_output_msg(key))
        elif isinstance(obj, (tuple, list)):
            for i, o in enumerate(obj):
                walk(o, f"{key}[{i}]")
        elif _logits_of(obj) is not None:
            items.append((f"{key}.logits", _logits_of(obj)))
        elif isinstance(obj, dict):
            for k in obj:
                walk(obj[k], f"{key}[{k!r}]")
        else:
            hint = ""
            if "Cache" in type(obj).__name__:
                hint = ("; this is a transformers cache: call the model with use_cache=False, "
                        "or return only the logits")
            raise TypeError(
                f"{argname}: expected a tensor, or a tuple/list/dict of tensors; "
                f"found {type(obj).__name__} at {key}{hint}")

    walk(output, argname)
    if not items:
        raise TypeError(f"{argname}: contains no tensor")
    return items


def differentiable_items(output: Any, *, argname: str = "output") -> List[Tuple[str, Tensor]]:
    """The flattened outputs that require grad; ``ValueError`` if none do
    (the output does not depend on the parameters)."""
    items = flatten_output(output, argname=argname)
    diff = [(k, t) for k, t in items if t.requires_grad]
    if not diff:
        raise ValueError(
            f"{argname}: does not depend on any parameter (no tensor in it requires grad); "
            "Functional-SAM needs the model output, not a detached copy")
    return diff


def check_not_loss(items: List[Tuple[str, Tensor]], loss: Optional[Tensor], *,
                   argname: str = "closure output") -> None:
    """``ValueError`` naming ``argname`` when one of the outputs is the loss
    tensor itself (the same tensor, or the same autograd node and output)."""
    if loss is None:
        return
    for k, t in items:
        if t is loss or (t.grad_fn is not None and t.grad_fn is loss.grad_fn
                         and t.output_nr == loss.output_nr):
            raise ValueError(f"{k} is the loss itself; back-propagating it with its "
                             "own cotangent (1) would make Functional-SAM plain SAM. " + _RULE)


def _dependencies(items: List[Tuple[str, Tensor]]) -> List[Tuple[int, int]]:
    """Pairs (i, j): output i is computed from output j (j reachable from i's
    autograd graph), or i and j are the same tensor."""
    if len(items) < 2:
        return []
    edges: Dict[Tuple[int, int], int] = {}
    leaves: Dict[int, int] = {}
    pairs = set()
    # the Python wrappers of autograd nodes may be created on access and freed
    # after it, so an id() is unique only while its object lives: hold every
    # node whose id is used as a key until the walk is over
    keep: List[Any] = []
    for j, (_, t) in enumerate(items):
        keep.append(t.grad_fn)
        key = (id(t.grad_fn), t.output_nr) if t.grad_fn is not None else None
        table, k = (edges, key) if key is not None else (leaves, id(t))
        if k in table:
            pairs.add((j, table[k]))
        else:
            table[k] = j
    for i, (_, t) in enumerate(items):
        if t.grad_fn is None:
            continue
        stack = list(t.grad_fn.next_functions)
        seen = set()
        while stack:
            node, nr = stack.pop()
            if node is None:
                continue
            j = edges.get((id(node), nr))
            if j is not None and j != i:
                pairs.add((i, j))
            var = getattr(node, "variable", None)
            if var is not None and id(var) in leaves and leaves[id(var)] != i:
                pairs.add((i, leaves[id(var)]))
            if id(node) not in seen:
                seen.add(id(node))
                keep.append(node)
                stack.extend(node.next_functions)
    return sorted(pairs)


def check_recorded(keys: List[str], shapes: List[tuple], cotangents: List[Optional[Tensor]],
                   deps: List[Tuple[int, int]], *, argname: str = "output") -> None:
    """After the pass-1 backward: ``ValueError`` naming ``argname`` when a 0-d
    output (a loss) received a cotangent, or when two outputs that depend on
    one another (or are the same tensor) both did: replaying both would count
    the shared path twice."""
    for k, s, c in zip(keys, shapes, cotangents):
        if c is not None and len(s) == 0:
            raise ValueError(f"{k} is a 0-d tensor that the loss depends on (a loss "
                             "among the outputs?); its cotangent would add the loss's own "
                             "gradient (SAM's) to Functional-SAM's. " + _RULE
                             + " (a genuine scalar model output: return it with shape (1,))")
    for i, j in deps:
        if cotangents[i] is not None and cotangents[j] is not None:
            raise ValueError(
                f"{keys[i]} is computed from {keys[j]} (or is the same tensor) and "
                "the loss depends on both; replaying both cotangents would count the "
                f"gradient through {keys[i]} twice. " + _RULE)


class _Slot:
    __slots__ = ("keys", "shapes", "cotangents", "handles", "deps", "argname", "gen")

    def __init__(self, items, argname="output", gen=None):
        self.argname = argname
        self.gen = gen
        self.keys = [k for k, _ in items]
        self.shapes = [tuple(t.shape) for _, t in items]
        self.cotangents: List[Optional[Tensor]] = [None] * len(items)
        self.handles = []
        self.deps = _dependencies(items)


_NO_COTANGENT_MSG = (
    "CotangentRecorder: the captured output's backward hook received no gradient (None): "
    "the output and the loss were computed in one torch.compile graph (e.g. "
    "torch.compile(FunctionalSAM.step), or a compiled function that returns both), so "
    "autograd has no edge from the output to the loss and c0 = d loss / d output cannot "
    "be recorded. Compile the model instead (torch.compile(model)) and call the "
    "optimizer's step eagerly, or compile first_step/second_step (docs/loops.md, "
    "torch.compile)")


class CotangentRecorder:
    """Records ∂ℓ/∂z of each pass-1 micro-batch and replays it in pass 2.

    ``capture(out)`` selects the model output z of ``out`` (see ``output``
    below), registers gradient hooks on every tensor of z that requires
    grad and returns ``out`` unchanged; the user's ``loss.backward()`` then
    fills the recorded cotangents (same shape and dtype as the outputs).
    ``replay(out1)`` pops the oldest record and runs
    ``torch.autograd.backward(z1, c0)``, accumulating J(θ+e)ᵀ c0 into
    ``.grad``. Outputs that received no gradient in pass 1 (the loss does
    not use them) are skipped in pass 2.

    Args:
        output: which part of the model's return value is z:
            None (default): a Hugging Face ``ModelOutput`` (or an object with
            a ``logits`` tensor) stands for its ``.logits``; anything else
            (a tensor, tuple, list or dict of tensors) is z as it is;
            a str: a key (dict, ModelOutput) or attribute name; an int: an
            index into a tuple/list; a callable: ``output(out) -> z``.
        optimizer: optional, the FunctionalSAM whose steps the records belong
            to. With it every record is tied to the step of its pass 1: a
            replay of a record from an earlier step, a replay with no
            ``first_step()`` pending and a capture while one is pending raise
            ``RuntimeError``, and ``optimizer.second_step()`` raises (before
            changing anything) while records of the step are not replayed.
            Without it the recorder only sees its own calls: a ``capture()``
            after a ``replay()`` (a new pass 1) raises while records of the
            previous pass remain.

    Raises ``ValueError`` (at replay, or at ``check()``) when the loss
    depends on a 0-d output (the loss itself among the outputs) or on two
    outputs computed one from the other (both would be replayed: the shared
    path counted twice); ``RuntimeError`` when replaying with nothing
    recorded, when the pass-1 backward has not run, when the pass-2
    output's structure or shapes differ from the recorded ones (the record
    is kept then: a corrected replay may follow), and for the mismatched
    pass counts above (the message gives how many records were left).
    """

    def __init__(self, output: Selector = None, *, optimizer: Any = None) -> None:
        check_selector(output, argname="output")
        if optimizer is not None and not hasattr(optimizer, "_step_vars"):
            raise TypeError(f"optimizer: expected a fsam_kernels optimizer (SAM or "
                            f"FunctionalSAM) or None, got {type(optimizer).__name__}")
        self.output = output
        self.optimizer = optimizer
        self._slots: deque = deque()
        self._replayed = False      # a replay ran since the last capture (pass 2 began)
        if optimizer is not None:
            register_recorder(optimizer, self)

    def __len__(self) -> int:
        return len(self._slots)

    def __bool__(self) -> bool:
        # always true: `if rec:` must not depend on whether records are held
        return True

    def pending(self) -> int:
        """Records of the optimizer's current step not replayed yet (0 without
        an optimizer, or with no first_step() pending)."""
        opt = self.optimizer
        if opt is None or getattr(opt, "_perturbed", None) is None:
            return 0
        now = step_generation(opt)
        return sum(1 for s in self._slots if s.gen is not None and s.gen + 1 == now)

    def clear(self) -> None:
        """Forget every recorded cotangent (and remove pending hooks)."""
        for s in self._slots:
            for h in s.handles:
                h.remove()
        self._slots.clear()
        self._replayed = False

    def _items(self, output: Any, argname: str) -> List[Tuple[str, Tensor]]:
        z = select_output(output, self.output, argname=argname)
        if _is_head_output(z):
            raise ValueError(_head_in_output_msg(argname))
        return differentiable_items(z, argname=argname)

    def capture(self, output: Any, *, argname: str = "output") -> Any:
        """Register hooks recording ∂ℓ/∂z of the selected model output z;
        returns ``output`` unchanged. ``argname`` names the output in errors."""
        opt = self.optimizer
        gen = None
        if opt is not None:
            if getattr(opt, "_perturbed", None) is not None:
                raise RuntimeError("CotangentRecorder.capture: a first_step() is pending "
                                   "(pass 2); capture the pass-1 outputs, replay() in pass 2")
            gen = step_generation(opt)
            old = sum(1 for s in self._slots if s.gen != gen)
            if old:
                raise _stale_capture_error("CotangentRecorder", old, "a first_step() came "
                                           "after them")
        elif self._replayed and self._slots:
            raise _stale_capture_error("CotangentRecorder", len(self._slots),
                                       "pass 2 replayed fewer micro-batches than pass 1 "
                                       "captured")
        self._replayed = False
        items = self._items(output, argname)
        slot = _Slot(items, argname, gen)
        for i, (_, t) in enumerate(items):
            def hook(grad, i=i, slot=slot):
                if grad is None:       # only under torch.compile (see _NO_COTANGENT_MSG)
                    raise RuntimeError(_NO_COTANGENT_MSG)
                slot.cotangents[i] = grad.detach()
            slot.handles.append(t.register_hook(hook))
        self._slots.append(slot)
        return output

    def received(self) -> bool:
        """True when the newest record received a gradient (its backward ran
        and the loss depends on at least one of the captured outputs)."""
        return bool(self._slots) and any(c is not None for c in self._slots[-1].cotangents)

    def check(self, argname: str = "output") -> None:
        """Check the newest record after its backward (see the class's Raises)."""
        if self._slots:
            s = self._slots[-1]
            check_recorded(s.keys, s.shapes, s.cotangents, s.deps, argname=argname)

    def _peek(self) -> "_Slot":
        """The oldest record, checked (generation, received, dependencies) but
        not removed."""
        if not self._slots:
            raise RuntimeError("CotangentRecorder.replay: no recorded cotangent left; "
                               "call capture() on each pass-1 output before backward()")
        slot = self._slots[0]
        if all(c is None for c in slot.cotangents):
            raise RuntimeError(
                "CotangentRecorder.replay: the recorded output received no gradient; "
                "run loss.backward() in pass 1 after capture()")
        if self.optimizer is not None:
            _check_replay_generation("CotangentRecorder", self.optimizer, slot.gen)
        check_recorded(slot.keys, slot.shapes, slot.cotangents, slot.deps, argname=slot.argname)
        return slot

    def _remove_oldest(self) -> "_Slot":
        slot = self._slots.popleft()
        for h in slot.handles:
            h.remove()
        self._replayed = True
        return slot

    def pop(self) -> Tuple["_Slot", List[Optional[Tensor]]]:
        """Remove and return the oldest record: (slot, cotangents). Raises
        (keeping the record) as ``replay`` for a record that cannot be replayed."""
        slot = self._peek()
        self._remove_oldest()
        return slot, slot.cotangents

    def replay(self, output: Any, *, retain_graph: bool = False) -> None:
        """Backward of the pass-2 model output (selected from ``output`` by the
        same rule as in ``capture``) with the oldest recorded cotangent. The
        output's structure and shapes are checked before the record is removed."""
        slot = self._peek()
        cots = slot.cotangents
        items = self._items(output, slot.argname)
        keys = [k for k, _ in items]
        if keys != slot.keys:
            raise RuntimeError(
                f"CotangentRecorder.replay: output structure {keys} differs from the "
                f"recorded {slot.keys}")
        tensors, grads = [], []
        for (k, t), shape, c in zip(items, slot.shapes, cots):
            if tuple(t.shape) != shape:
                raise RuntimeError(
                    f"CotangentRecorder.replay: output {k} has shape {tuple(t.shape)}, "
                    f"the recorded cotangent has shape {shape}")
            if c is None:
                continue
            tensors.append(t)
            grads.append(c)
        self._remove_oldest()
        torch.autograd.backward(tensors, grads, retain_graph=retain_graph)
        note_replay(self.optimizer)
