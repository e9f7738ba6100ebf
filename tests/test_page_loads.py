"""Every tab's page-load handler answered as one event (components/page_loads.py): what each handler gives lands in
its components, a failing handler blanks nothing else. (That the app sends one load event, not two dozen: in
tests/test_app_main.py, beside the timers, on the app it builds.)"""

from __future__ import annotations

import gradio as gr
import pytest

from components.page_loads import LOAD_FAILED, answer_page_loads, on_page_load


def _answer(event: object, values: list, request: object = None) -> tuple:
    """Call the page's load event as gradio does for a page: its inputs' values, then the request, positionally
    (where the event's signature puts it)."""
    return event.fn(*values, request)


def test_each_handler_fills_its_components_and_shares_merge(monkeypatch):
    warnings: list[str] = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    seen_requests = []

    def named(greeting: str, name: str) -> str:
        return f"{greeting}, {name}"

    def who(count: float, request: gr.Request = None) -> tuple:
        seen_requests.append(request)
        return count + 1, gr.update(interactive=False)

    def refuses() -> str:
        raise gr.Error("That run is not yours.")

    def breaks() -> str:
        raise KeyError("status")

    with gr.Blocks() as page:
        greeting, name, count = gr.Textbox("Hello"), gr.Textbox("Ada"), gr.Number(1)
        out, shared, skipped, refused, broken = (gr.Textbox() for _ in range(5))
        on_page_load(named, inputs_kwargs={"greeting": greeting, "name": name}, outputs=out)
        on_page_load(who, count, [count, shared])
        on_page_load(lambda: ("later", gr.skip()), None, [skipped, shared])  # a skip keeps the earlier update
        on_page_load(lambda: gr.update(label="merged"), None, shared)  # two updates of one component combine
        on_page_load(refuses, None, refused)
        on_page_load(breaks, None, broken)
        event = answer_page_loads(page)
    dependencies = [d for d in page.config["dependencies"] if any(t[1] == "load" for t in d["targets"])]
    assert len(dependencies) == 1 and dependencies[0]["id"] == event["id"]
    assert dependencies[0]["outputs"] == [b._id for b in (out, count, shared, skipped, refused, broken)]

    request = object()
    answers = _answer(event, ["Hi", "Grace", 4], request)
    assert answers[0] == "Hi, Grace" and answers[1] == 5 and answers[3] == "later"
    assert answers[2] == {"__type__": "update", "interactive": False, "label": "merged"}
    assert answers[4] == answers[5] == gr.skip()  # both failures leave their components as they were
    assert seen_requests == [request]
    assert warnings == ["That run is not yours.", LOAD_FAILED]  # the refusal in its own words; a fault, generic


def test_answers_merge_as_two_events_in_a_row_would_leave_them(monkeypatch):
    warnings: list[str] = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    with gr.Blocks() as page:
        first, second, third = gr.Textbox(), gr.Textbox(), gr.Textbox()
        on_page_load(lambda: ("a value", gr.update(label="shown")), None, [first, second])
        on_page_load(lambda: (gr.update(label="later"), "b value"), None, [first, second])
        on_page_load(lambda: gr.skip(), None, [first, second, third])  # a bare skip: all three as they are
        on_page_load(lambda: {third: "by name"}, None, [first, third])  # gradio's dict form is not taken here
        event = answer_page_loads(page)
    assert _answer(event, []) == ({"__type__": "update", "value": "a value", "label": "later"},
                                  {"__type__": "update", "value": "b value", "label": "shown"}, gr.skip())
    assert warnings == [LOAD_FAILED]


def test_a_handler_gradio_would_refuse_is_refused_when_asked_for():
    async def waits() -> str:
        return "later"

    with gr.Blocks() as page:
        box = gr.Textbox()
        with pytest.raises(TypeError, match="not both"):
            on_page_load(lambda text: text, box, box, inputs_kwargs={"text": box})
        with pytest.raises(TypeError, match="no generators, no coroutines"):
            on_page_load(waits, None, box)
        with pytest.raises(TypeError, match="two_inputs"):
            on_page_load(two_inputs, box, box)  # one input for a handler that needs two
        answer_page_loads(page)
        with pytest.raises(RuntimeError, match="already answered"):
            on_page_load(lambda: "late", None, box)


def two_inputs(first: str, second: str) -> str:
    return first + second


def test_a_follow_up_runs_after_the_one_load_event():
    with gr.Blocks() as page:
        box, after = gr.Textbox(), gr.Textbox()
        on_page_load(lambda: "first", None, box).then(lambda text: text + " then", box, after)
        event = answer_page_loads(page)
    follow_up = [d for d in page.config["dependencies"] if d["trigger_after"] == event["id"]]
    assert [d["outputs"] for d in follow_up] == [[after._id]]


def test_a_generator_is_refused_when_asked_for():
    def streams():
        yield "a"

    with gr.Blocks():
        with pytest.raises(TypeError, match="no generators"):
            on_page_load(streams, None, gr.Textbox())

