"""Show the code, the cells: a run's config -> the notebook's markdown and code cells, in plain transformers + peft +
trl + bitsandbytes. finetune/services/take_home.py reads the run, writes the cells as a notebook and a script, and
has the CLI; this module only turns a config (and the run's rows) into cells.

    cells = take_home_cells(cfg, "demo", RunData(rows, None, "prompt_completion"), run_info, files={})
"""

from __future__ import annotations

import importlib.metadata

from finetune.core.config import KTO_LOSSES, TRACKIO_PROJECT, RunConfig
from finetune.core.estimate import checkpointing_choice
from finetune.core.hardware import profile_for
from finetune.core.lora_init import scaling
from finetune.services.export import hub_base
from finetune.services.take_home_data import Cell, RunData, data_cells, split_cells

# What the notebook installs, pinned to the versions this app trains with (torch is left to the machine: Colab's
# own CUDA build is the right one there, and a pinned CPU build would be the wrong one).
PINNED = ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
T4 = profile_for("cuda", "NVIDIA T4", 15.0, (7, 5))
PREFERENCE_STAGES = ("dpo", "kto")  # the RLHF stages the code is written for (reward and GRPO: not yet)
TRAINERS = {"sft": ("SFTConfig", "SFTTrainer"), "dpo": ("DPOConfig", "DPOTrainer"), "kto": ("KTOConfig", "KTOTrainer")}
SUMMARY_FILE = "summary.json"  # what the script writes beside its adapter: counts, losses (the proof test reads it)
HELD_OUT_FILE = "held_out.jsonl"


class TakeHomeError(RuntimeError):
    """A run whose code cannot be shown; the message says why."""


# --- the cells --------------------------------------------------------------------------------------------------

def pinned_versions(report_to: str = "none") -> dict[str, str]:
    """The libraries and their versions here, with the tracker the run reports to (Colab has none of them)."""
    names = PINNED + ((report_to,) if report_to in ("trackio", "wandb", "mlflow") else ())
    return {name: importlib.metadata.version(name) for name in names}


def intro_cells(cfg: RunConfig, run_name: str, info: dict) -> list[Cell]:
    trainable = info.get("trainable_parameters")
    counted = f" LoRA Lab counted **{trainable:,}** trainable parameters in it." if trainable else ""
    pins = ", ".join(f'"{name}=={version}"' for name, version in pinned_versions(cfg.training.report_to).items())
    return [
        Cell("markdown", f"# Run `{run_name}`, as plain code\n\nThis notebook does what your LoRA Lab run did, with "
                         "the libraries the course uses (transformers, peft, trl, bitsandbytes) and nothing of LoRA "
                         f"Lab's own: a {_method_words(cfg)} of `{_model_name(cfg)}` on your data.{counted} It is "
                         "written for a T4 (the course's Colab GPU) and runs on any CUDA GPU or on the CPU.\n\n"
                         "First, the libraries, pinned to the versions your run trained with (torch is left as the "
                         "machine has it: Colab's build matches its GPU)."),
        Cell("code", "import importlib.metadata\nimport subprocess\nimport sys\n\n"
                     f"PINNED = [{pins}]\n\n\ndef installed(pin):\n    name, version = pin.split(\"==\")\n"
                     "    try:\n        return importlib.metadata.version(name) == version\n"
                     "    except importlib.metadata.PackageNotFoundError:\n        return False\n\n\n"
                     "missing = [pin for pin in PINNED if not installed(pin)]\nif missing:\n"
                     "    subprocess.check_call([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", *missing])\n"
                     "print(\"libraries ready:\", \", \".join(PINNED))"),
    ]


def _method_words(cfg: RunConfig) -> str:
    if cfg.stage in PREFERENCE_STAGES:
        what = {"dpo": "DPO (direct preference optimization on chosen/rejected pairs)",
                "kto": "KTO (preference optimization on thumbs up/down)"}[cfg.stage]
        start = f"the SFT adapter `{cfg.preference.start_adapter}`" if cfg.preference.start_adapter else \
            f"a fresh LoRA on a {cfg.model.bits}-bit base"
        return f"{what} of {start}"
    method = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "ia3": "IA3", "prompt_tuning": "prompt tuning",
              "full": "full fine-tune"}[cfg.lora.method]
    return f"QLoRA ({method} on a 4-bit base)" if cfg.model.bits == 4 and cfg.lora.method != "full" \
        else f"{method} on a {cfg.model.bits}-bit base"


def _model_name(cfg: RunConfig) -> str:
    return hub_base(cfg) or cfg.model.source


def settings_cells(cfg: RunConfig, run_name: str) -> list[Cell]:
    source = _model_name(cfg)
    note = ""
    if source != cfg.model.source:
        note = (f"\n\nYour run used LoRA Lab's embedded `{cfg.model.source}`: a 4-bit GGUF copy of `{source}`, "
                "dequantized. The Hub's original weights differ from it by that rounding, so your numbers here "
                "will be close to the run's, not equal.")
    elif hub_base(cfg) is None:
        note = ("\n\nYour run's base model is a folder on the machine that ran LoRA Lab. Copy it beside this "
                "notebook (or put a Hub id here) before you run it elsewhere.")
    return [
        Cell("markdown", "## Settings\n\nThe base model, the seed and where the results go. The seed fixes the "
                         f"data split, the data order and the adapter's random start: with {cfg.training.seed}, "
                         f"as in your run, you get the same split and the same start.{note}"),
        Cell("code", f"MODEL_ID = {source!r}\nSEED = {cfg.training.seed}\n"
                     f"OUTPUT_DIR = {run_name + '-take-home'!r}\nMAX_LENGTH = {cfg.data.max_seq_length}  "
                     "# longest row in tokens; longer rows are dropped (not cut), so no answer is truncated"),
    ]


def hardware_cells(cfg: RunConfig) -> list[Cell]:
    if cfg.model.compute_dtype != "auto":
        choice = (f"COMPUTE_DTYPE = torch.{cfg.model.compute_dtype}  # set in your run's config")
    else:
        choice = ("if not ON_GPU:\n    COMPUTE_DTYPE = torch.float32   # bf16 matmuls on a CPU are many times slower\n"
                  "elif torch.cuda.get_device_capability()[0] >= 8:\n"
                  "    COMPUTE_DTYPE = torch.bfloat16  # Ampere and newer\nelse:\n"
                  "    COMPUTE_DTYPE = torch.float16   # T4, V100: no fast bf16")
    return [
        Cell("markdown", "## The hardware and the compute dtype\n\nThe frozen base is stored in few bits, but the "
                         "matrix multiplications run in a 16 or 32-bit *compute dtype*: float16 on a T4, bfloat16 "
                         "on Ampere and newer GPUs, float32 on a CPU."),
        Cell("code", f"import torch\n\nON_GPU = torch.cuda.is_available()\n{choice}\n"
                     "print(\"device:\", torch.cuda.get_device_name(0) if ON_GPU else \"CPU\", \"| compute dtype:\", "
                     "COMPUTE_DTYPE)"),
    ]


def tokenizer_cells() -> list[Cell]:
    return [
        Cell("markdown", "## The tokenizer\n\nIt turns text into token ids and, through the model's chat template, "
                         "a conversation into one sequence. Batches need a padding token; many models have none, so "
                         "the end-of-sequence token stands in."),
        Cell("code", "from transformers import AutoTokenizer\n\ntokenizer = AutoTokenizer.from_pretrained(MODEL_ID)\n"
                     "if tokenizer.pad_token is None:\n    tokenizer.pad_token = tokenizer.eos_token\n"
                     "if not tokenizer.chat_template:  # ChatML, the template LoRA Lab falls back to\n"
                     "    tokenizer.chat_template = (\"{% for message in messages %}{{ '<|im_start|>' + message['role'] "
                     "+ '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                     "{{ '<|im_start|>assistant\\n' }}{% endif %}\")"),
    ]


# --- model, adapter, trainer --------------------------------------------------------------------------------------

def model_cells(cfg: RunConfig) -> list[Cell]:
    m = cfg.model
    if m.bits == 4:
        quant = (f"bnb_config = BitsAndBytesConfig(\n    load_in_4bit=True,\n"
                 f"    bnb_4bit_quant_type={m.quant_type!r},  # NormalFloat-4: levels spaced for normally distributed "
                 f"weights\n    bnb_4bit_use_double_quant={m.double_quant},  # quantize the quantization constants too\n"
                 "    bnb_4bit_compute_dtype=COMPUTE_DTYPE,\n)\n")
        words = (f"The frozen base is stored in 4 bits ({m.quant_type.upper()}"
                 f"{', double quantization' if m.double_quant else ''}): about a quarter of its 16-bit size. ")
    elif m.bits == 8:
        quant, words = "bnb_config = BitsAndBytesConfig(load_in_8bit=True)  # LLM.int8\n", \
            "The frozen base is stored in 8 bits (LLM.int8). "
    else:
        quant, words = "bnb_config = None  # no quantization\n", f"The base is loaded at {m.bits} bits. "
    if m.bits in (4, 8):
        load = ("model = AutoModelForCausalLM.from_pretrained(MODEL_ID, quantization_config=bnb_config, "
                "dtype=COMPUTE_DTYPE,\n                                             device_map={\"\": 0 if ON_GPU "
                "else \"cpu\"}, attn_implementation=\"sdpa\")")
    else:
        dtype = "torch.float32" if m.bits == 32 else \
            "torch.bfloat16 if not ON_GPU or COMPUTE_DTYPE == torch.bfloat16 else torch.float16"
        load = (f"model = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype={dtype}, attn_implementation=\"sdpa\")"
                "\nif ON_GPU:\n    model.to(\"cuda\")")
    return [Cell("markdown", f"## The quantization config and the base model\n\n{words}It is never trained: only "
                             "the small adapter beside it is. Unlike the classic QLoRA notebook, this does not call "
                             "`prepare_model_for_kbit_training`: that upcasts every weight that is not quantized to "
                             "float32, which costs memory and time, and the adapter trains in float32 anyway."),
            Cell("code", f"from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n\n{quant}{load}\n"
                         "model.config.use_cache = False  # the generation cache is no use while training")]


def peft_config_code(cfg: RunConfig) -> str:
    lora, method = cfg.lora, cfg.lora.method
    targets = lora.target_module_list()
    if method == "full":
        return "peft_config = None  # a full fine-tune: every weight trains"
    if method == "ia3":
        feedforward = lora.feedforward_module_list()
        targets = None if feedforward is None and targets == "all-linear" else targets
        return ("from peft import IA3Config\n\npeft_config = IA3Config(target_modules="
                f"{targets!r}, feedforward_modules={feedforward!r}, task_type=\"CAUSAL_LM\")")
    if method == "prompt_tuning":
        text = lora.prompt_init_text.strip()
        init = (f", prompt_tuning_init=\"TEXT\", prompt_tuning_init_text={text!r}, tokenizer_name_or_path=MODEL_ID"
                if text else "")
        return ("from peft import PromptTuningConfig\n\npeft_config = PromptTuningConfig(num_virtual_tokens="
                f"{lora.num_virtual_tokens}, task_type=\"CAUSAL_LM\"{init})")
    extra = "".join([",\n    use_dora=True" if method == "dora" else "",
                     ",\n    use_rslora=True  # scale by alpha / sqrt(r)" if method == "rslora" else "",
                     f",\n    init_lora_weights={lora.init!r}" if lora.init in ("pissa", "olora") else ""])
    return (f"from peft import LoraConfig\n\npeft_config = LoraConfig(\n    r={lora.rank},  # the rank of B·A\n"
            f"    lora_alpha={lora.alpha:g},  # the update is scaled by alpha / r = {scaling(lora):g}\n"
            f"    lora_dropout={lora.dropout:g},\n    target_modules={targets!r},\n    bias={lora.bias!r},\n"
            f"    task_type=\"CAUSAL_LM\"{extra},\n)")


def start_adapter_cells(cfg: RunConfig, start_folder: str) -> list[Cell]:
    """DPO/KTO on an SFT adapter: that adapter trains further and, frozen, is also the reference."""
    return [Cell("markdown", f"## The adapter to start from\n\nYour run trained the SFT adapter "
                             f"`{cfg.preference.start_adapter}` further; TRL keeps a frozen copy of it as the reference "
                             "the policy may not drift far from. The path below is where it lies on the machine that "
                             "ran LoRA Lab: download it there (Export tab, 'Download adapter (.zip)'), unzip it beside "
                             "this notebook, and put its folder here."),
            Cell("code", f"from peft import PeftModel\n\nSTART_ADAPTER = {start_folder!r}\n"
                         "model = PeftModel.from_pretrained(model, START_ADAPTER, is_trainable=True)\n"
                         "peft_config = None  # the adapter is already on the model")]


def peft_cells(cfg: RunConfig, start_folder: str | None = None) -> list[Cell]:
    if start_folder:
        return start_adapter_cells(cfg, start_folder)
    lora = cfg.lora
    words = {"lora": f"LoRA trains a low-rank update B·A of rank {lora.rank} beside each targeted weight "
                     f"(`{lora.target_modules}`), scaled by alpha / r; B starts at zero, so step 0 is exactly the "
                     "base model.",
             "dora": "DoRA: LoRA on each weight's direction, plus a trained magnitude per output.",
             "rslora": "rsLoRA: LoRA scaled by alpha / sqrt(r), steadier at high ranks.",
             "ia3": "IA3: one learned scaling vector per targeted layer, the fewest trainable parameters.",
             "prompt_tuning": f"Prompt tuning: {lora.num_virtual_tokens} trained virtual tokens in front of every "
                              "input; the model itself is untouched.",
             "full": "A full fine-tune: every weight trains (the reference point for the PEFT methods)."}[lora.method]
    if lora.init == "loftq":
        words += (" Your run starts the adapter with **LoftQ**: A and B begin as the best rank-r fix of the 4-bit "
                  "rounding error, a few cells below, once the trainer has built the adapter.")
    elif lora.init in ("pissa", "olora"):
        words += (f" Your run starts it with **{lora.init.upper() if lora.init == 'pissa' else 'OLoRA'}** (peft's "
                  "`init_lora_weights`): part of each weight moves into the adapter. Save the result with "
                  "`path_initial_model_for_weight_conversion` (peft's docs) to load it as a plain LoRA on the "
                  "unchanged base, as LoRA Lab does.")
    return [Cell("markdown", f"## The adapter\n\n{words}"), Cell("code", peft_config_code(cfg))]


def warmup_value(cfg: RunConfig) -> float:
    """Warmup in whole steps, rounded down, as LoRA Lab's trainer sets it (transformers rounds a ratio up, and a
    linear warmup's first step learns nothing); a run bounded by epochs keeps the ratio."""
    t = cfg.training
    return t.warmup_ratio if t.max_steps <= 0 else int(t.warmup_ratio * t.max_steps)


def checkpointing_code(cfg: RunConfig) -> tuple[str, str]:
    """(the expression, the sentence that says why): 'auto' follows LoRA Lab's memory estimate for a T4."""
    mode = cfg.training.gradient_checkpointing
    if mode != "auto":
        return repr(mode == "on"), f"gradient checkpointing is {mode}, as set in your run"
    on_t4, why = checkpointing_choice(cfg, T4)
    return ("ON_GPU" if on_t4 else "False"), f"on a T4, {why}; on a CPU it stays off (RAM is not the limit there)"


def stage_argument_lines(cfg: RunConfig) -> str:
    """The arguments only this stage's config class has."""
    p = cfg.preference
    if cfg.stage == "dpo":
        loss = p.loss_type if p.loss_type not in KTO_LOSSES else "sigmoid"
        return (f"    beta={p.beta:g},  # how far the policy may move from the reference: higher = closer\n"
                f"    loss_type=[{loss!r}],\n    max_length=MAX_LENGTH,  # longer pairs are truncated\n")
    if cfg.stage == "kto":
        loss = p.loss_type if p.loss_type in KTO_LOSSES else "kto"
        return (f"    beta={p.beta:g},  # how far the policy may move from the reference: higher = closer\n"
                f"    loss_type={loss!r},\n    max_length=MAX_LENGTH,  # longer rows are truncated\n")
    padding_free = cfg.training.padding_free and cfg.lora.method != "prompt_tuning"
    return (f"    padding_free={padding_free},  # the batch's rows in one row, no padding\n"
            f"    max_length={None if padding_free else 'MAX_LENGTH'},  # rows were already filtered to MAX_LENGTH\n")


def training_cells(cfg: RunConfig) -> list[Cell]:
    t = cfg.training
    padding_free = cfg.stage == "sft" and t.padding_free and cfg.lora.method != "prompt_tuning"
    checkpointing, why = checkpointing_code(cfg)
    optimizer = "\"adamw_torch_fused\" if ON_GPU else \"adamw_torch\"" if t.optimizer == "adamw_torch" \
        else repr(t.optimizer)
    best = ""
    if t.watches_best():
        best = (f"    save_steps={t.eval_steps},  # a checkpoint at every evaluation, so the best one is on disk\n"
                "    metric_for_best_model=\"eval_loss\", greater_is_better=False,\n"
                f"    load_best_model_at_end={t.keep == 'best'},\n")
    else:
        best = f"    save_steps={t.save_steps},\n"
    code = (
        f"from trl import {TRAINERS[cfg.stage][0]}\n\nargs = {TRAINERS[cfg.stage][0]}(\n"
        "    output_dir=f\"{OUTPUT_DIR}/checkpoints\",\n"
        f"    learning_rate={t.learning_rate:g}, lr_scheduler_type={t.lr_scheduler!r}, warmup_steps={warmup_value(cfg)!r},\n"
        f"    num_train_epochs={t.num_epochs:g}, max_steps={t.max_steps},\n"
        f"    per_device_train_batch_size={t.batch_size}, per_device_eval_batch_size={t.batch_size},\n"
        f"    gradient_accumulation_steps={t.gradient_accumulation},\n"
        f"    optim={optimizer}, weight_decay={t.weight_decay:g}, max_grad_norm={t.max_grad_norm:g},\n"
        f"    gradient_checkpointing={checkpointing},\n"
        "    gradient_checkpointing_kwargs={\"use_reentrant\": False},\n"
        "    seed=SEED, data_seed=SEED,\n"
        f"    logging_steps={t.logging_steps}, logging_first_step=True,\n"
        "    eval_strategy=\"steps\" if held_out is not None else \"no\", "
        f"eval_steps={t.eval_steps if t.eval_steps > 0 else None},\n"
        f"    save_strategy=\"steps\",\n{best}    save_total_limit=2,\n"
        "    bf16=ON_GPU and COMPUTE_DTYPE == torch.bfloat16, fp16=ON_GPU and COMPUTE_DTYPE == torch.float16,\n"
        f"    use_cpu=not ON_GPU,\n{stage_argument_lines(cfg)}"
        f"    report_to={t.report_to!r},{_tracker_line(t.report_to)}\n)")
    words = (f"Your run's settings: learning rate {t.learning_rate:g} with a {t.lr_scheduler} schedule, "
             f"{'%d steps' % t.max_steps if t.max_steps > 0 else '%g epoch(s)' % t.num_epochs} of "
             f"{t.batch_size} rows x {t.gradient_accumulation} accumulation, evaluated every {t.eval_steps} steps. "
             f"Mixed precision follows the compute dtype; {why}.")
    if padding_free:
        words += (" **Padding-free batches**: the rows of a batch are concatenated into one row with per-row "
                  "position ids, so no compute goes to padding and attention never crosses rows.")
    return [Cell("markdown", f"## The training arguments\n\n{words}"), Cell("code", code)]


def _tracker_line(report_to: str) -> str:
    if report_to == "trackio":
        return f"  # see the curves: trackio show --project {TRACKIO_PROJECT}\n    project={TRACKIO_PROJECT!r},"
    if report_to == "wandb":
        return "  # the key comes from WANDB_API_KEY (or `wandb login`), never from this notebook"
    return ""


LOFTQ_CODE = (
    "import bitsandbytes as bnb\n\n# The full-precision weights, read once on the CPU to measure each 4-bit weight's "
    "rounding error.\nfull_precision = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype=torch.float32).state_dict()\n"
    "with torch.no_grad():\n    for name, layer in trainer.model.named_modules():\n"
    "        if \"default\" not in getattr(layer, \"lora_A\", {}) or "
    "layer.base_layer.weight.__class__.__name__ != \"Params4bit\":\n            continue\n"
    "        weight = layer.base_layer.weight\n"
    "        rounded = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()\n"
    "        error = full_precision[name.removeprefix(\"base_model.model.\") + \".weight\"].to(rounded.device) - rounded\n"
    "        u, s, vh = torch.linalg.svd(error, full_matrices=False)  # best rank-r fix: the top r singular values\n"
    "        rank, scale = layer.r[\"default\"], layer.scaling[\"default\"]\n"
    "        root = torch.sqrt(s[:rank] / scale)  # divided by the scale, so scale x B·A is the fix itself\n"
    "        layer.lora_A[\"default\"].weight.copy_(root[:, None] * vh[:rank])\n"
    "        layer.lora_B[\"default\"].weight.copy_(u[:, :rank] * root)\ndel full_precision")


TRAINER_WORDS = {
    "sft": "TRL's `SFTTrainer` wraps the model with the adapter, tokenizes the rows with the chat template and masks the "
           "prompt out of the loss.",
    "dpo": "TRL's `DPOTrainer` raises the chosen answer's likelihood against the rejected one's, each measured against "
           "the reference model (the starting point, here the model with its adapter switched off or frozen).",
    "kto": "TRL's `KTOTrainer` raises the likelihood of answers with a thumbs up and lowers it for a thumbs down, "
           "against the reference model (the starting point).",
}


def trainer_cells(cfg: RunConfig) -> list[Cell]:
    trainer = TRAINERS[cfg.stage][1]
    code = (f"from trl import {trainer}\n\n"
            f"trainer = {trainer}(model=model, args=args, train_dataset=train_rows, eval_dataset=held_out,\n"
            f"{' ' * (len(trainer) + 11)}processing_class=tokenizer, peft_config=peft_config)\n")
    if cfg.training.early_stopping_patience > 0:
        code += ("from transformers import EarlyStoppingCallback\n\ntrainer.add_callback(EarlyStoppingCallback("
                 f"early_stopping_patience={cfg.training.early_stopping_patience}, "
                 f"early_stopping_threshold={cfg.training.early_stopping_threshold:g}))\n")
    code += ("# TRL casts a quantized model's adapter to bfloat16; keep it in float32 unless the GPU computes in bf16\n"
             "# (fp16 mixed precision needs float32 master weights, and bf16 math is slow on a CPU).\n"
             "if COMPUTE_DTYPE != torch.bfloat16:\n    for name, parameter in trainer.model.named_parameters():\n"
             "        if (parameter.requires_grad or \"lora_\" in name) and parameter.dtype != torch.float32:\n"
             "            parameter.data = parameter.data.float()\n"
             "trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)\n"
             "print(f\"{trainable:,} trainable parameters\")")
    if cfg.stage in PREFERENCE_STAGES:
        code += ("\nif held_out is not None:  # the held-out loss and margins before any step: a measured start\n"
                 "    print(trainer.evaluate())")
    cells = [Cell("markdown", f"## The trainer\n\n{TRAINER_WORDS[cfg.stage]} It sets the seed before it builds the "
                              "adapter, so LoRA's random A starts where your run's did."), Cell("code", code)]
    if cfg.stage == "sft" and cfg.lora.init == "loftq" and cfg.model.bits == 4:
        cells += [Cell("markdown", "## LoftQ: start the adapter at the rounding error's fix\n\nFor each 4-bit "
                                   "weight W with rounded copy deq(Q), A and B start so that scale x B·A is the best "
                                   "rank-r approximation of W - deq(Q): base + adapter begins closer to the "
                                   "full-precision model. (peft's own `init_lora_weights=\"loftq\"` needs a GPU and "
                                   "the unquantized model; these lines do the one-step version LoRA Lab does.)"),
                  Cell("code", LOFTQ_CODE)]
    return cells


# --- train, evaluate, compare, save -------------------------------------------------------------------------------

def result_cells(cfg: RunConfig, data: RunData, run_name: str) -> list[Cell]:
    question = ("[{\"role\": \"user\", \"content\": row[\"text\"][:200]}]" if data.format == "text" else
                "row[\"prompt\"] if isinstance(row[\"prompt\"], list) else [{\"role\": \"user\", \"content\": "
                "row[\"prompt\"]}]")
    return [
        Cell("markdown", "## Train\n\nThe loss is printed every logging step; on held-out rows every "
                         f"{cfg.training.eval_steps} steps."),
        Cell("code", "trainer.train()"),
        Cell("markdown", "## Evaluate on the held-out rows\n\nThe held-out loss, and its perplexity (e to the loss: "
                         "how many tokens the model hesitates between, on average)."),
        Cell("code", "import math\n\nif held_out is not None:\n    held_out_loss = trainer.evaluate()[\"eval_loss\"]\n"
                     "    print(f\"held-out loss {held_out_loss:.4f}, perplexity {math.exp(held_out_loss):.2f} on "
                     "{len(held_out)} rows\")\nelse:\n    held_out_loss = None\n"
                     "    print(\"no held-out rows: the data was too small to hold some out\")"),
        Cell("markdown", "## Base and tuned, side by side\n\nThe same prompt, greedy decoding, with the adapter on and "
                         "off: the adapter's whole effect is the difference."),
        Cell("code", "row = (held_out if held_out is not None else train_rows)[0]\n"
                     f"inputs = tokenizer.apply_chat_template({question}, add_generation_prompt=True, "
                     "return_tensors=\"pt\",\n                                       return_dict=True).to(trainer.model.device)\n"
                     "trainer.model.eval()\nwith torch.no_grad():\n"
                     "    tuned = trainer.model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
                     "    with trainer.model.disable_adapter():\n"
                     "        base = trainer.model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
                     "start = inputs[\"input_ids\"].shape[1]\n"
                     "print(\"BASE: \", tokenizer.decode(base[0, start:], skip_special_tokens=True))\n"
                     "print(\"TUNED:\", tokenizer.decode(tuned[0, start:], skip_special_tokens=True))"
                     if cfg.lora.method != "full" else
                     "print(\"a full fine-tune has no adapter to switch off: compare with the base model loaded "
                     "again\")"),
        Cell("markdown", "## Save, and push to the Hub\n\nThe adapter is a few MB: it loads onto the same base with "
                         "`PeftModel.from_pretrained(base, folder)`. The held-out rows and a summary of the run are "
                         "saved beside it. To push, log in first (`huggingface-cli login`, or `HF_TOKEN` in Colab's "
                         "secrets: never paste a token into a notebook you share)."),
        Cell("code", "import json\nimport os\n\n" + (
            "trainer.save_model(f\"{OUTPUT_DIR}/adapter\")\n" if cfg.stage == "sft" else
            "# the trained adapter only (with a starting adapter, TRL also holds its frozen reference copy, \"ref\")\n"
            "trainer.model.save_pretrained(f\"{OUTPUT_DIR}/adapter\", selected_adapters=[\"default\"])\n") +
                     "tokenizer.save_pretrained(f\"{OUTPUT_DIR}/adapter\")\n"
                     f"with open(f\"{{OUTPUT_DIR}}/{HELD_OUT_FILE}\", \"w\", encoding=\"utf-8\") as file:\n"
                     "    for held_row in held_out or []:\n"
                     "        file.write(json.dumps(held_row, ensure_ascii=False) + \"\\n\")\n"
                     "summary = {\"trainable_parameters\": trainable, \"train_rows\": len(train_rows),\n"
                     "           \"held_out_rows\": 0 if held_out is None else len(held_out), "
                     "\"held_out_loss\": held_out_loss,\n"
                     "           \"losses\": [(log[\"step\"], log[\"loss\"]) for log in trainer.state.log_history "
                     "if \"loss\" in log]}\n"
                     f"with open(f\"{{OUTPUT_DIR}}/{SUMMARY_FILE}\", \"w\", encoding=\"utf-8\") as file:\n"
                     "    json.dump(summary, file, indent=1)\nprint(\"saved to\", os.path.abspath(OUTPUT_DIR))\n"
                     f"# trainer.model.push_to_hub(\"your-name/{run_name}-lora\", private=True)"),
    ]


def left_out_cell(cfg: RunConfig) -> Cell:
    notes = [] if cfg.stage != "sft" or not cfg.training.padding_free else ["**Row-by-row packed attention.** On a CPU LoRA Lab runs each row of a padding-free batch through "
             "causal attention on its own, and on Ampere or newer GPUs through PyTorch's variable-length flash "
             "kernel. Here transformers builds one block-diagonal mask over the packed row: the same attention, "
             "so the same numbers up to rounding, but its cost grows with the square of the batch's total length "
             "(on a T4 LoRA Lab uses that mask too)."]
    if cfg.training.cpu_lm_head:
        notes.append("**The CPU LM head.** On a CPU LoRA Lab scores only the answer tokens with one log-softmax "
                     "instead of TRL's tiled GPU function: the same numbers, steps 1.2-1.5x faster there. On a GPU "
                     "both use TRL's, so on a T4 this costs nothing.")
    if cfg.training.liger_kernels:
        notes.append("**Liger kernels.** On a CUDA GPU with `pip install liger-kernel`, LoRA Lab adds "
                     "`use_liger_kernel=True` (fused RMSNorm, RoPE and SwiGLU: the same math in less memory); add "
                     "it to the SFTConfig above to do the same.")
    notes.append("**The app around the run**: live curves, the Stop button, resuming, and the metrics file the app "
                 "draws from. The trainer's own logs (and TensorBoard, `report_to`) stand in for them.")
    return Cell("markdown", "## What LoRA Lab did that this leaves out\n\n" + "\n".join(f"- {n}" for n in notes))


def take_home_cells(cfg: RunConfig, run_name: str, data: RunData, info: dict, files: dict[str, str],
                    start_folder: str | None = None) -> list[Cell]:
    """The whole notebook; ``files`` receives the data files that were too big to embed (name -> text);
    ``start_folder`` is the adapter a DPO/KTO run started from."""
    if cfg.stage not in TRAINERS:
        raise TakeHomeError(f"Show the code covers SFT, DPO and KTO runs for now; this is a {cfg.stage} run (its "
                            "TRL trainer and the reward model it needs are not generated yet).")
    if cfg.training.processes > 1:
        raise TakeHomeError("Show the code writes a single-process run; this run used several processes "
                            f"({cfg.training.strategy}). Copy its settings into `accelerate launch` yourself.")
    return [*intro_cells(cfg, run_name, info), *settings_cells(cfg, run_name), *hardware_cells(cfg),
            *tokenizer_cells(), *data_cells(cfg, run_name, data, files), *split_cells(cfg, data),
            *model_cells(cfg), *peft_cells(cfg, start_folder), *training_cells(cfg), *trainer_cells(cfg),
            *result_cells(cfg, data, run_name), left_out_cell(cfg)]
