"""The Export tab: take a finished run away as an adapter zip or as code (a notebook and a script), merge it into its
base model, or push it to the Hub.

Each action writes into the run's own folder (``export/``, ``merged/``), so nothing a visitor exports lands in
another run. The Hub token is typed per push into a password box and used only for that call: on a shared Space
nobody pushes with the Space owner's token, and the token is never echoed, logged or stored. Where sign-in is on,
a visitor lists only the runs they may see, only a run's owner (or an operator) zips, merges, builds or pushes it,
and a push uses the visitor's own sign-in token, once they tick the consent box, and nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gradio as gr

from components.downloads import current_download, download_folder, downloadable
from components.page_loads import on_page_load
from components.shared import bind, refusal, require_visible, visible_adapters, visitor_of
from finetune.core.access import AccessDenied, Visitor, sign_in_hint, sign_in_mode
from finetune.core.data import DataError, first_line
from finetune.core.hardware import detect
from finetune.core.models import ModelSourceError
from finetune.core.run_folder import ADAPTER_DIR, MERGED_DIR, MODEL_CONFIG
from finetune.core.storage import DiskFull, folder_bytes, require_free
from finetune.services.admission import RunError
from finetune.services.export import (MERGE_TARGETS, PLOT_FILE, ExportError, merge_adapter, merge_dtype, merge_report,
                                      model_card, push_folder, run_config, write_model_card, zip_adapter)
from finetune.services.gguf_convert import GGUF_TYPES, base_model_config, modelfile_name, ollama_command
from finetune.services.gguf_export import write_gguf, zip_merged
from finetune.services.gguf_hub import push_gguf
from finetune.services.gguf_measure import drift_text
from finetune.services.gguf_plan import DiskPlan, disk_plan, gguf_path, parameter_shapes
from finetune.services.runs import RunManager
from finetune.services.take_home import TakeHomeError, zip_take_home

PUSH_KINDS = ("Adapter", "Merged model")
CONSENT = "Use my Hugging Face sign-in token to push to my account"


def export_choices(manager: RunManager, current: str | None = None, request: gr.Request = None) -> Any:
    """Finished runs with an adapter that the visitor may see, newest first; keeps the current pick while it
    still exists."""
    ids = list(visible_adapters(manager, visitor_of(request)))
    return gr.Dropdown(choices=ids, value=current if current in ids else (ids[0] if ids else None))


def _run_dir(manager: RunManager, run_id: str | None, visitor: Visitor, act: str | None = None) -> Path:
    """The run's folder, once the visitor may see it and, for ``act`` (zip, merge, build, push), act on it."""
    if not run_id:
        raise refusal("Pick a finished run first (train one in the Train tab).")
    try:
        require_visible(manager, run_id, visitor, act or "look at this run")
        folder = manager.run_dir(run_id)
        if act:
            manager.require_can_act(run_id, visitor, act)
    except (RunError, AccessDenied) as error:
        raise refusal(str(error)) from None
    if run_id not in manager.finished_adapters():
        raise refusal(f"Run '{run_id}' has no saved adapter to export.")
    return folder


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 2**20:.1f} MB"


def merged_bytes(folder: Path) -> int:
    """About what merging the run writes: every weight of its base at the merge dtype, read from the base's
    config alone (no weights loaded); 0 when the config cannot be read (the merge then says why)."""
    try:
        cfg = run_config(folder)
        shapes = parameter_shapes(base_model_config(cfg.model.source))
        return sum(math.prod(shape) for _, shape in shapes) * merge_dtype(cfg, detect()).itemsize
    except (ExportError, ModelSourceError, OSError, ValueError):
        return 0


def _require_free(folder: Path, needed: int, what: str) -> None:
    try:
        require_free(folder, needed, what)
    except DiskFull as error:
        raise refusal(str(error)) from None


def push_token(visitor: Visitor, typed: str | None, consent: bool) -> str | None:
    """The token a push uses. Without sign-in: the one typed for this push. With sign-in: the visitor's own
    sign-in token and nothing else, only once they consent: never a typed one, never the Space's HF_TOKEN."""
    if not visitor.sign_in:
        return typed
    if not consent:
        raise refusal(f"Tick '{CONSENT}' first: a push on this app uses your own Hugging Face sign-in, with your "
                      "consent, and nothing else.")
    if not visitor.token:
        raise refusal(f"{sign_in_hint()} to push: your sign-in gives the token a push to your account uses.")
    return visitor.token


def preview_card(manager: RunManager, run_id: str | None, request: gr.Request = None) -> tuple[str, str | None]:
    """The adapter's model card as it will be pushed, and its loss plot."""
    if not run_id:
        return "Pick a run to see its model card.", None
    folder = _run_dir(manager, run_id, visitor_of(request))
    try:
        card = write_model_card(folder, folder / ADAPTER_DIR)
    except ExportError as error:
        raise refusal(str(error)) from None
    plot = card.parent / PLOT_FILE
    # The Hub reads the card's YAML header as metadata; shown as code here so it does not render as prose.
    _, header, body = model_card(folder, plot_name=None).split("---\n", 2)
    return f"```yaml\n{header}```\n{body}", str(plot) if plot.is_file() else None


def export_zip(manager: RunManager, run_id: str | None, request: gr.Request = None) -> tuple[str, str]:
    """Zip the adapter for download: (zip path for the file component, message)."""
    folder = _run_dir(manager, run_id, visitor_of(request), "export this run")
    _require_free(folder, folder_bytes(folder / ADAPTER_DIR), "zip this run's adapter")
    try:
        path = zip_adapter(folder)
    except ExportError as error:
        raise refusal(str(error)) from None
    return downloadable(path), (f"`{path.name}` ({_size(path)}): unzip it into a folder and load it with "
                       f"`PeftModel.from_pretrained(base, folder)`.")


def export_code(manager: RunManager, run_id: str | None, request: gr.Request = None) -> tuple[str, str]:
    """Show the code: the run as a notebook and a script in plain transformers + peft + trl + bitsandbytes, zipped
    with the data files too big to embed (the run's rows: only its owner may take them)."""
    folder = _run_dir(manager, run_id, visitor_of(request), "export this run's code")
    try:
        path = zip_take_home(folder)
    except (TakeHomeError, ExportError) as error:
        raise refusal(str(error)) from None
    name = path.name.removesuffix("-code.zip")
    return downloadable(path), (f"`{path.name}`: `{name}.ipynb` (open it in Colab: File > Upload notebook, with any "
                                f"`.jsonl` from the zip beside it) and the same as `{name}.py`; neither needs LoRA "
                                "Lab. Also from a terminal: `python -m finetune.services.take_home runs/<run id>`.")


MERGE_CHOICES = {"Weights it trained against (answers as in Chat)": "trained",
                 "Original-precision weights": "original"}


def merge_model(manager: RunManager, run_id: str | None, target: str | None = None, request: gr.Request = None,
                progress: gr.Progress = gr.Progress()) -> str:
    """Merge the adapter into a float copy of its base, then compare the merged model's validation loss with the
    adapter's on the same rows, so any difference from what was chatted with is visible."""
    folder = _run_dir(manager, run_id, visitor_of(request), "merge this run")
    into = MERGE_CHOICES.get(target or next(iter(MERGE_CHOICES)))
    if into is None:
        raise refusal(f"Choose what to merge into: {' or '.join(MERGE_CHOICES)}.")
    _require_free(folder, merged_bytes(folder), "merge this run into its base model")
    try:
        output = merge_adapter(folder, into=into, progress=lambda fraction, text: progress(fraction, desc=text))
        progress(0.9, desc="Validation loss: adapter vs merged model")
        report = merge_report(folder, output).summary()
    except (ExportError, ModelSourceError) as error:
        raise refusal(str(error)) from None
    except (DataError, ValueError) as error:  # the run's data is gone or unreadable: the merge itself is done
        report = f"No loss comparison: {first_line(error)}"
    except (MemoryError, RuntimeError) as error:  # a base too large for this machine's RAM
        raise gr.Error(f"Merging failed: {error}") from None
    files = ", ".join(sorted(p.name for p in output.iterdir()))
    return (f"Merged model ({MERGE_TARGETS[into]}): saved in the run's `{MERGED_DIR}/` folder ({_size(output)}): "
            f"{files}.\n\n{report}\n\nPush it to the Hub below.")


def push_model(manager: RunManager, run_id: str | None, what: str, repo_id: str, token: str, private: bool,
               consent: bool = False, request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> str:
    """Push the adapter (or the merged model) with a freshly written model card; returns a link."""
    visitor = visitor_of(request)
    folder = _run_dir(manager, run_id, visitor, "push this run")
    token = push_token(visitor, token, consent)
    if what not in PUSH_KINDS:
        raise refusal(f"Choose what to push: {' or '.join(PUSH_KINDS)}.")
    merged = what == "Merged model"
    target = folder / (MERGED_DIR if merged else ADAPTER_DIR)
    if merged and not (target / MODEL_CONFIG).is_file():
        raise refusal("There is no merged model for this run yet: click 'Merge into base model' first.")
    try:
        write_model_card(folder, target, merged=merged)
        url = push_folder(target, repo_id, token, private=bool(private), run_dir=folder,
                          progress=lambda fraction, text: progress(fraction, desc=text))
    except (ExportError, ModelSourceError) as error:
        raise refusal(str(error)) from None
    except Exception as error:  # the Hub's own refusals (bad token, no write access) as one line, never the token
        raise refusal(f"The Hub refused the push: {type(error).__name__}: {first_line(error)}")
    return f"Pushed the {what.lower()} of `{run_id}` to [{repo_id}]({url})."


def _merge_into(target: str | None) -> str:
    into = MERGE_CHOICES.get(target or next(iter(MERGE_CHOICES)))
    if into is None:
        raise refusal(f"Choose what to merge into: {' or '.join(MERGE_CHOICES)}.")
    return into


def _downloaded(folder: Path, out_type: str) -> bool:
    """Both download copies of the run's built GGUF (the file and its Modelfile) are there and current."""
    path = gguf_path(folder, out_type)
    return all(current_download(p) for p in (path, path.parent / modelfile_name(path.name)))


def _plan(folder: Path, out_type: str, into: str) -> DiskPlan:
    """What a build writes: the merged model, the GGUF, and the one download copy in gradio's cache."""
    return disk_plan(folder, out_type, into=into, downloads=(download_folder(),),
                     downloaded=_downloaded(folder, out_type))


def gguf_plan(manager: RunManager, run_id: str | None, out_type: str | None, target: str | None = None,
              request: gr.Request = None) -> str:
    """Before building: the sizes of what a build writes, the folders it lands in and the free disk there. It
    runs on every change of run, type or merge target, so a refusal is shown as text here, not as an error."""
    if not run_id:
        return "Pick a finished run to see what building its GGUF would write, and where."
    try:
        folder, into = _run_dir(manager, run_id, visitor_of(request)), _merge_into(target)
    except gr.Error as error:
        return str(error.message)
    try:
        return _plan(folder, out_type or "", into).summary()
    except (ExportError, ModelSourceError) as error:
        return str(error)


def plan_when_shown(manager: RunManager, shown: bool, run_id: str | None, out_type: str | None,
                    target: str | None = None, request: gr.Request = None) -> Any:
    """The plan, while the section is open; a closed one is planned when it opens. A plan reads the tokenizer and
    counts every metadata byte (seconds of CPU), which every page load would otherwise spend on a closed section."""
    return gguf_plan(manager, run_id, out_type, target, request) if shown else gr.skip()


def _opened() -> bool:
    return True


def _closed() -> bool:
    return False


def build_gguf(manager: RunManager, run_id: str | None, out_type: str | None, target: str | None = None,
               request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> tuple[list[str], str]:
    """Merge and write the run as a GGUF file plus its Ollama Modelfile: (files to download, message)."""
    folder = _run_dir(manager, run_id, visitor_of(request), "export this run")
    into = _merge_into(target)
    _require_free(folder, 0, "build a GGUF")  # the minimum kept free; write_gguf then checks what it writes
    try:
        # write_gguf checks the disk once, inside its build lock, counting the download copy made below too.
        result = write_gguf(folder, out_type or "", into=into, downloads=(download_folder(),),
                            progress=lambda fraction, text: progress(fraction, desc=text))
    except (ExportError, ModelSourceError) as error:
        raise refusal(str(error)) from None
    except (MemoryError, RuntimeError) as error:  # a base too large for this machine's RAM
        raise gr.Error(f"GGUF export failed: {first_line(error)}") from None
    files = [downloadable(result.path), downloadable(result.modelfile)]
    progress(0.95, desc="How far the file drifts from the adapter")
    try:
        drift = drift_text(folder, result)
    except (DataError, ValueError, ExportError) as error:  # the run's data is gone: the file itself is fine
        drift = f"No drift measurement: {first_line(error)}"
    return files, (f"{result.summary()}\n\n{drift}\n\nRun it with llama.cpp (`llama-cli -m {result.path.name} -cnv`) or "
                   f"create an Ollama model from the Modelfile beside it:\n\n```\n{ollama_command(result)}\n```")


def push_gguf_file(manager: RunManager, run_id: str | None, out_type: str | None, repo_id: str, token: str,
                   private: bool, consent: bool = False, request: gr.Request = None,
                   progress: gr.Progress = gr.Progress()) -> str:
    """Push the run's built GGUF, its Modelfile and a model card with the visitor's token; returns a link."""
    visitor = visitor_of(request)
    folder = _run_dir(manager, run_id, visitor, "push this run")
    token = push_token(visitor, token, consent)
    try:
        url = push_gguf(folder, out_type or "", repo_id, token, private=bool(private),
                        progress=lambda fraction, text: progress(fraction, desc=text))
    except (ExportError, ModelSourceError) as error:
        raise refusal(str(error)) from None
    except Exception as error:  # the Hub's own refusals (bad token, no write access) as one line, never the token
        raise refusal(f"The Hub refused the push: {type(error).__name__}: {first_line(error)}")
    repo_id = repo_id.strip()
    return (f"Pushed the {out_type} GGUF of `{run_id}`, its Modelfile and a model card to [{repo_id}]({url}).")


def download_merged(manager: RunManager, run_id: str | None, target: str | None = None,
                    request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> tuple[str, str]:
    """The merged model folder (safetensors, config, tokenizer, model card) as one zip."""
    folder = _run_dir(manager, run_id, visitor_of(request), "export this run")
    _require_free(folder, merged_bytes(folder), "zip the merged model")
    try:
        path = zip_merged(folder, into=_merge_into(target),
                          progress=lambda fraction, text: progress(fraction, desc=text))
    except (ExportError, ModelSourceError) as error:
        raise refusal(str(error)) from None
    return downloadable(path), (f"`{path.name}` ({_size(path)}): unzip it and load the folder with "
                                "`AutoModelForCausalLM.from_pretrained(folder)`.")


def _build_gguf_section(manager: RunManager, run: Any, merge_target: Any) -> dict[str, Any]:
    with gr.Accordion("Take it home: GGUF for llama.cpp / Ollama, merged model download", open=False) as section:
        with gr.Row():
            gguf_type = gr.Dropdown(list(GGUF_TYPES), value="q8_0", label="GGUF type", elem_id="export-gguf-type",
                                    info="; ".join(f"{k}: {v}" for k, v in GGUF_TYPES.items()))
            gguf_button = gr.Button("Build GGUF + Modelfile", elem_id="export-gguf")
            merged_button = gr.Button("Download merged model (.zip)", elem_id="export-merged-zip")
        gguf_plan_text = gr.Markdown(elem_id="export-gguf-plan")
        gguf_files = gr.File(label="GGUF file and Ollama Modelfile", file_count="multiple", interactive=False,
                             elem_id="export-gguf-files")
        merged_file = gr.File(label="Merged model zip", interactive=False, elem_id="export-merged-file")
        gguf_message = gr.Markdown(elem_id="export-gguf-message")
    shown = gr.State(False)  # whether this visitor has the section open
    section.expand(_opened, None, shown, api_visibility="private")
    section.collapse(_closed, None, shown, api_visibility="private")
    plan, plan_inputs = bind(gguf_plan, manager), [run, gguf_type, merge_target]
    gr.on([section.expand, gguf_type.change, merge_target.change], plan, plan_inputs, gguf_plan_text,
          api_name="gguf_plan")
    run.change(bind(plan_when_shown, manager), [shown, *plan_inputs], gguf_plan_text,
               api_visibility="private")
    # Building holds a merged float model in RAM: one at a time per app (write_gguf also refuses a second
    # build of the same run from another process). Afterwards the plan says what is now reused.
    gguf_button.click(bind(build_gguf, manager), [run, gguf_type, merge_target],
                      [gguf_files, gguf_message], api_name="export_gguf", concurrency_limit=1,
                      concurrency_id="export-merge"
                      ).then(plan, plan_inputs, gguf_plan_text, api_visibility="private")
    merged_button.click(bind(download_merged, manager), [run, merge_target],
                        [merged_file, gguf_message], api_name="download_merged", concurrency_limit=1,
                        concurrency_id="export-merge"
                        ).then(plan, plan_inputs, gguf_plan_text, api_visibility="private")
    return {"gguf_type": gguf_type, "gguf": gguf_button, "gguf_files": gguf_files, "merged_zip": merged_button,
            "merged_file": merged_file, "gguf_message": gguf_message, "gguf_plan": gguf_plan_text,
            "gguf_shown": shown}


def build_export_tab(manager: RunManager) -> dict[str, Any]:
    signed_in = sign_in_mode() != "off"
    with gr.Row():
        run = gr.Dropdown([], label="Finished run", elem_id="export-run", scale=3, allow_custom_value=True,
                          info="Runs that saved an adapter.")
        refresh = gr.Button("Refresh runs", size="sm", scale=1)
    with gr.Row():
        zip_button = gr.Button("Download adapter (.zip)", elem_id="export-zip")
        merge_button = gr.Button("Merge into base model", elem_id="export-merge")
        code_button = gr.Button("Show the code (notebook + script)", elem_id="export-code")
    merge_target = gr.Radio(list(MERGE_CHOICES), value=next(iter(MERGE_CHOICES)), label="Merge into",
                            elem_id="export-merge-target",
                            info="A 4/8-bit base cannot absorb the update: the adapter is added to a float copy. "
                                 "The weights it trained against are the dequantized 4/8-bit ones, so that merged "
                                 "model is the one that answers exactly as the Chat tab does (its loss differs by "
                                 "rounding only: the message shows it); the original weights differ by the "
                                 "quantization error, which the adapter never saw. A GGUF built from the merge "
                                 "rounds it again to its type: the build measures how far it drifts.")
    zip_file = gr.File(label="Adapter zip", elem_id="export-zip-file", interactive=False)
    code_file = gr.File(label="The run as code (.ipynb + .py)", elem_id="export-code-file", interactive=False)
    message = gr.Markdown(elem_id="export-message")
    gguf = _build_gguf_section(manager, run, merge_target)
    with gr.Accordion("Push to the Hugging Face Hub", open=False):
        with gr.Row():
            what = gr.Radio(list(PUSH_KINDS), value=PUSH_KINDS[0], label="What to push")
            repo_id = gr.Textbox(label="Repo id", placeholder="your-name/my-lora", elem_id="export-repo")
            token = gr.Textbox(label="Your Hugging Face write token", type="password", elem_id="export-token",
                               info="Used for this push only; never stored or shown.", visible=not signed_in)
            # With sign-in, a push uses the visitor's own sign-in token, never a typed one nor the Space's.
            consent = gr.Checkbox(value=False, label=CONSENT, elem_id="export-consent", visible=signed_in)
            private = gr.Checkbox(value=True, label="Private repo")
        with gr.Row():
            push_button = gr.Button("Push", variant="primary", elem_id="export-push")
            gguf_push = gr.Button("Push GGUF file", elem_id="export-gguf-push")
        gr.Markdown("'Push GGUF file' sends the GGUF of the type chosen under 'Take it home' (build it there "
                    "first), its Ollama Modelfile and a model card with its type and size.")
    with gr.Accordion("Model card (pushed as README.md)", open=True):
        with gr.Row():
            card = gr.Markdown(elem_id="export-card")
            plot = gr.Image(label="Loss plot (loss.png)", type="filepath", interactive=False, elem_id="export-plot")
    merged = _wire(manager, run, refresh, zip_button, merge_button, push_button, zip_file, message, card, plot,
                   what, repo_id, token, private, merge_target, consent)
    merged.then(bind(plan_when_shown, manager), [gguf["gguf_shown"], run, gguf["gguf_type"],
                merge_target], gguf["gguf_plan"], api_visibility="private")  # the GGUF build reuses merged/
    code_button.click(bind(export_code, manager), run, [code_file, message], api_name="export_code")
    gguf_push.click(bind(push_gguf_file, manager), [run, gguf["gguf_type"], repo_id, token, private, consent],
                    message, api_name="push_gguf", concurrency_limit=2)
    return {"run": run, "refresh": refresh, "zip": zip_button, "merge": merge_button, "zip_file": zip_file,
            "code": code_button, "code_file": code_file,
            "merge_target": merge_target,
            "message": message, "what": what, "repo_id": repo_id, "token": token, "private": private,
            "consent": consent,
            "push": push_button, "gguf_push": gguf_push, "card": card, "plot": plot, **gguf}


def _wire(manager: RunManager, run: Any, refresh: Any, zip_button: Any, merge_button: Any, push_button: Any,
          zip_file: Any, message: Any, card: Any, plot: Any, what: Any, repo_id: Any, token: Any,
          private: Any, merge_target: Any, consent: Any) -> Any:
    """Returns the merge event, so the GGUF plan can follow it."""
    choices = bind(export_choices, manager)
    refresh.click(choices, run, run, api_name="export_runs")
    run.change(bind(preview_card, manager), run, [card, plot], api_name="model_card")
    zip_button.click(bind(export_zip, manager), run, [zip_file, message], api_name="export_zip")
    # Merging holds a whole unquantized base in RAM: one at a time per app.
    merged = merge_button.click(bind(merge_model, manager), [run, merge_target], message,
                                api_name="merge_adapter", concurrency_limit=1, concurrency_id="export-merge")
    push_button.click(bind(push_model, manager), [run, what, repo_id, token, private, consent], message,
                      api_name="push_to_hub", concurrency_limit=2)
    on_page_load(choices, run, run)
    return merged
