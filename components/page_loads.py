"""What the tabs do when a page (re)loads, sent as one event: each tab asks with ``on_page_load``, the app answers
them all with ``answer_page_loads`` once the tabs are built.

Why one event: on each status change of any event (pending, then complete), gradio's page updates the loading
status of every component that any event has ever updated, looking each up in the whole component tree. With the
two dozen load events the tabs asked for, a page load spent 4.2 of its 6.4 s of browser script in that bookkeeping;
with one event that fills the same components, 1.4 of ~3 s (what is left: the change events the loaded values
fire), and the server answers one request instead of two dozen (bench/page_load.py: 0.55-0.60x the browser's CPU).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr
from gradio.utils import check_function_inputs_match, get_type_hints

logger = logging.getLogger("lora_lab")
REGISTRY = "_lora_lab_page_loads"  # the list of PageLoads, kept on the page they were asked of
ANSWERED = "_lora_lab_page_loads_answered"  # set on a page once its loads are one event
LOAD_FAILED = "Part of this page could not load its current state (the app log says why): reload to try again."


def _request_parameters(fn: Callable[..., Any]) -> list[str]:
    """The parameters gradio would fill with the request (annotated ``gr.Request``; a plain functools.partial
    shows gradio no annotations, so it gets none, as from gradio itself)."""
    hints = get_type_hints(fn)
    return [name for name in inspect.signature(fn).parameters
            if hints.get(name) in (gr.Request, gr.Request | None)]


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


@dataclass
class PageLoad:
    """One tab's page-load handler: ``fn`` reads ``inputs`` (or the named ``inputs_kwargs``) and fills ``outputs``.
    ``then`` asks for a handler to run after the page load, as gradio's ``Dependency.then`` does."""

    fn: Callable[..., Any]
    inputs: list[Any]
    names: list[str] | None  # the parameter names of inputs given as inputs_kwargs
    outputs: list[Any]
    follow_ups: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    wants_request: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.wants_request = _request_parameters(self.fn)

    def then(self, *args: Any, **kwargs: Any) -> None:
        self.follow_ups.append((args, kwargs))

    def call(self, values: list[Any], request: gr.Request | None) -> list[Any]:
        """This handler's answer, one value per output, as gradio reads a handler's return."""
        extra = {name: request for name in self.wants_request}
        result = self.fn(**dict(zip(self.names, values)), **extra) if self.names is not None \
            else self.fn(*values, **extra)
        if len(self.outputs) == 1:
            return [result]
        if _is_skip(result):  # a bare gr.skip(): every output stays as it is
            return [result] * len(self.outputs)
        if isinstance(result, dict):
            raise TypeError(f"{_name(self.fn)}: a page load returns its values in the order of its outputs")
        if len(result) != len(self.outputs):
            raise ValueError(f"{_name(self.fn)} returned {len(result)} values for {len(self.outputs)} outputs")
        return list(result)


def _as_list(blocks: Any) -> list[Any]:
    return [] if blocks is None else list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]


def _check_handler(fn: Callable[..., Any], inputs: Any, inputs_kwargs: dict[str, Any] | None) -> None:
    """What gradio checks of an event's handler when it is wired (here: refused, not only warned of)."""
    if inputs is not None and inputs_kwargs:
        raise TypeError(f"{_name(fn)}: give inputs or inputs_kwargs, not both")
    plain = inspect.unwrap(fn)
    if any(check(plain) for check in (inspect.isgeneratorfunction, inspect.iscoroutinefunction,
                                      inspect.isasyncgenfunction)):
        raise TypeError(f"{_name(fn)}: a page load answers at once (no generators, no coroutines)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gradio only warns of a wrong number of inputs
        try:
            problem = check_function_inputs_match(fn, _as_list(inputs), False, inputs_kwargs)
        except (UserWarning, ValueError) as error:
            problem = str(error)
    if problem:
        raise TypeError(f"{_name(fn)}: {problem}")


def on_page_load(fn: Callable[..., Any], inputs: Any = None, outputs: Any = None,
                 inputs_kwargs: dict[str, Any] | None = None) -> PageLoad | None:
    """Run ``fn`` on every page (re)load of the app being built (a reload re-attaches to running jobs). gradio
    offers no public handle to the enclosing Blocks while a tab is built, so this is the one place that reads it.
    None for a tab built on its own, outside an app."""
    page = gr.context.Context.root_block
    if page is None:
        return None
    if page.__dict__.get(ANSWERED):
        raise RuntimeError(f"{_name(fn)}: this page's loads were already answered (answer_page_loads comes last)")
    _check_handler(fn, inputs, inputs_kwargs)
    load = PageLoad(fn, list(inputs_kwargs.values()) if inputs_kwargs else _as_list(inputs),
                    list(inputs_kwargs) if inputs_kwargs else None, _as_list(outputs))
    page.__dict__.setdefault(REGISTRY, []).append(load)
    return load


def _is_update(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def _is_skip(value: Any) -> bool:
    return _is_update(value) and len(value) == 1


def _merged(earlier: Any, later: Any) -> Any:
    """Two answers for one component, as two events in a row would leave it: a skip keeps the earlier answer, a
    value after an update keeps the update's other properties, an update after a value keeps the value."""
    if _is_skip(later) or _is_skip(earlier):
        return earlier if _is_skip(later) else later
    if not (_is_update(earlier) or _is_update(later)):
        return later
    as_update = [value if _is_update(value) else {"__type__": "update", "value": value} for value in (earlier, later)]
    return {**as_update[0], **as_update[1]}


def answer_page_loads(page: gr.Blocks) -> Any:
    """One load event for every ``on_page_load`` of ``page`` (call it inside ``with page``, after the tabs): the
    handlers run in the order they were asked for; one that fails leaves its components as they were, says so, and
    does not keep the others from filling theirs (a component whose value gradio itself cannot read or write fails
    the whole event, as it failed its own before). Returns the event (None where nothing was asked)."""
    loads: list[PageLoad] = page.__dict__.pop(REGISTRY, [])
    page.__dict__[ANSWERED] = True
    if not loads:
        return None
    inputs = [block for load in loads for block in load.inputs]
    outputs = list({id(block): block for load in loads for block in load.outputs}.values())  # each once
    slot = {id(block): index for index, block in enumerate(outputs)}

    # A closure, not a module-level handler: gradio hands it the inputs of every handler above, in one flat list.
    def answer_all(*values: Any, request: gr.Request = None) -> Any:
        if len(values) > len(inputs):  # gradio hands the request positionally, after the inputs (the signature below)
            values, request = values[:len(inputs)], values[len(inputs)]
        answers: list[Any] = [gr.skip()] * len(outputs)
        start = 0
        for load in loads:
            given, start = list(values[start:start + len(load.inputs)]), start + len(load.inputs)
            for block, value in zip(load.outputs, _answer_or_skip(load, given, request)):
                answers[slot[id(block)]] = _merged(answers[slot[id(block)]], value)
        return tuple(answers) if len(outputs) > 1 else answers[0]

    parameters = [inspect.Parameter(f"value_{index}", inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for index in range(len(inputs))]
    parameters.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation=gr.Request))
    answer_all.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    answer_all.__annotations__ = {"request": gr.Request}
    # Quick reads for every page that opens: not held behind the default limit of 4 at a time per event. No progress
    # shown: over a hundred components would wear a spinner until the slowest handler has answered.
    event = page.load(answer_all, inputs, outputs, api_visibility="private", concurrency_limit=None,
                      show_progress="hidden")
    for load in loads:
        for args, kwargs in load.follow_ups:
            event.then(*args, **kwargs)
    return event


def _answer_or_skip(load: PageLoad, values: list[Any], request: gr.Request | None) -> list[Any]:
    try:
        return load.call(values, request)
    except gr.Error as error:  # meant for the visitor
        gr.Warning(error.message)
    except Exception:  # a fault: one tab's load must not blank the others
        logger.exception("page load %s failed", _name(load.fn))
        gr.Warning(LOAD_FAILED)
    return [gr.skip()] * len(load.outputs)
