"""Hosting LoRA Lab on a Hugging Face Space, and the app's hosting defaults (storage, preset, host).

    python -m finetune.services.deploy --space USER/NAME --dry-run  # print the plan; sends nothing, needs no network
    python -m finetune.services.deploy --space USER/NAME            # create or update the Space (HF_TOKEN or login)
    python -m finetune.services.deploy --write-readme-header        # README.md front matter from spaces_config.yaml
    python -m finetune.services.deploy --check-readme               # exit 1 if the README's front matter is stale

``spaces_config.yaml`` is the one source of the Space's settings. Spaces read their settings from the YAML
front matter of README.md, so that header is generated from it; secrets and variables are set through the API.
Secret values come from this machine's environment variables of the same name and are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.core.hardware import HardwareProfile
from finetune.core.paths import PROJECT_ROOT

SETTINGS_FILE = PROJECT_ROOT / "spaces_config.yaml"
README_FILE = PROJECT_ROOT / "README.md"
PERSISTENT_ROOT = Path("/data")  # where a Space mounts its persistent storage
HEADER_NOTE = ("# Generated from spaces_config.yaml by `python -m finetune.services.deploy --write-readme-header`; "
               "edit that.")
# What a Space needs to run the app; everything else (tests, runs, the virtualenv) stays home.
UPLOAD_PATTERNS = ("app.py", "requirements.txt", "README.md", "spaces_config.yaml", "finetune/*", "components/*",
                   "configs/*", "data/*")
IGNORE_PATTERNS = ("*__pycache__*", "*.pyc", "*.partial")
SPACE_HARDWARE = ("cpu-basic", "cpu-upgrade", "zero-a10g", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1",
                  "l40sx4", "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large",
                  "h100", "h100x8")
STORAGE_TIERS = ("small", "medium", "large")
# Scopes a Space may ask of its visitors on top of openid and profile (Hugging Face OAuth docs for Spaces).
OAUTH_SCOPES = ("email", "read-repos", "write-repos", "manage-repos", "inference-api", "read-billing")


class DeployError(RuntimeError):
    """Settings or a request that cannot be deployed; the message says what to fix."""


@dataclass
class SpaceSettings:
    """The Space's settings; the fields Spaces reads from README front matter keep their Hub names."""

    title: str = field(metadata={"help": "Space title shown on the Hub."})
    sdk_version: str = field(metadata={"help": "Gradio version the Space installs; must equal the pinned gradio."})
    emoji: str = field(default="🧪", metadata={"help": "Emoji on the Space's card."})
    colorFrom: str = field(default="indigo", metadata={"help": "Card gradient start colour."})
    colorTo: str = field(default="green", metadata={"help": "Card gradient end colour."})
    sdk: str = field(default="gradio", metadata={"help": "Space SDK; the app is a Gradio app."})
    python_version: str = field(default="3.11", metadata={"help": "Python version of the Space's image."})
    app_file: str = field(default="app.py", metadata={"help": "The file the Space runs."})
    hardware: str = field(default="t4-small", metadata={"help": "Hardware requested for the Space."})
    persistent_storage: str | None = field(default="small", metadata={
        "help": "Persistent storage tier mounted at /data (runs, feedback database, model cache live there)."})
    storage_bucket: str | None = field(default=None, metadata={
        "help": "Optional storage bucket 'user/name' to mount at /data (clients without storage tiers)."})
    secrets: list[str] = field(default_factory=list, metadata={
        "help": "Secret names set on the Space from this machine's environment; values are never printed."})
    variables: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Public environment variables of the Space."})
    default_preset: str = field(default="configs/t4-qlora.yaml", metadata={
        "help": "Preset the app opens with on the Space's hardware."})
    pinned: bool = field(default=False, metadata={"help": "Pin the Space on the owner's profile."})
    short_description: str = field(default="", metadata={"help": "One line under the title on the Hub."})
    license: str | None = field(default=None, metadata={"help": "License identifier shown on the Hub."})
    private: bool = field(default=False, metadata={"help": "Create the Space as private."})
    hf_oauth: bool = field(default=True, metadata={
        "help": "'Sign in with Hugging Face' on the Space: runs, comparisons and feedback get owners."})
    hf_oauth_scopes: list[str] = field(default_factory=list, metadata={
        "help": "Extra OAuth scopes beyond openid/profile (write-repos, manage-repos: a visitor's own push)."})

    def __post_init__(self) -> None:
        problems = []
        if self.sdk != "gradio":
            problems.append(f"sdk must be 'gradio' (the app is a Gradio app), got {self.sdk!r}")
        if self.hardware not in SPACE_HARDWARE:
            problems.append(f"hardware must be one of {', '.join(SPACE_HARDWARE)}, got {self.hardware!r}")
        if self.persistent_storage not in (None, *STORAGE_TIERS):
            problems.append(f"persistent_storage must be empty or one of {', '.join(STORAGE_TIERS)}, "
                            f"got {self.persistent_storage!r}")
        if not (PROJECT_ROOT / self.app_file).is_file():
            problems.append(f"app_file {self.app_file!r} does not exist")
        if not (PROJECT_ROOT / self.default_preset).is_file():
            problems.append(f"default_preset {self.default_preset!r} does not exist")
        if not isinstance(self.secrets, list) or not all(isinstance(s, str) and s for s in self.secrets):
            problems.append("secrets must be a list of environment variable names")
        if not isinstance(self.hf_oauth_scopes, list) or not set(self.hf_oauth_scopes) <= set(OAUTH_SCOPES):
            problems.append(f"hf_oauth_scopes must be a list drawn from {', '.join(OAUTH_SCOPES)}")
        if not isinstance(self.variables, dict):
            problems.append("variables must map names to values")
        if problems:
            raise DeployError("spaces_config.yaml: " + "; ".join(problems))
        self.sdk_version, self.python_version = str(self.sdk_version), str(self.python_version)
        self.variables = {str(k): str(v) for k, v in self.variables.items()}


def load_settings(path: str | Path = SETTINGS_FILE) -> SpaceSettings:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise DeployError(f"Cannot read {path}: {error}") from None
    known = {f.name for f in dataclasses.fields(SpaceSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DeployError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return SpaceSettings(**raw)
    except TypeError as error:  # a required setting is missing
        raise DeployError(f"{path}: {error}") from None


# --- README front matter ------------------------------------------------------------------------------------

def front_matter(settings: SpaceSettings) -> dict[str, Any]:
    """The keys Spaces reads from README.md, in the Hub's own names."""
    meta: dict[str, Any] = {"title": settings.title, "emoji": settings.emoji, "colorFrom": settings.colorFrom,
                            "colorTo": settings.colorTo, "sdk": settings.sdk, "sdk_version": settings.sdk_version,
                            "python_version": settings.python_version, "app_file": settings.app_file,
                            "pinned": settings.pinned, "suggested_hardware": settings.hardware}
    if settings.persistent_storage:
        meta["suggested_storage"] = settings.persistent_storage
    if settings.short_description:
        meta["short_description"] = settings.short_description
    if settings.license:
        meta["license"] = settings.license
    if settings.hf_oauth:
        meta["hf_oauth"] = True
        if settings.hf_oauth_scopes:
            meta["hf_oauth_scopes"] = list(settings.hf_oauth_scopes)
    return meta


def front_matter_text(settings: SpaceSettings) -> str:
    body = yaml.safe_dump(front_matter(settings), sort_keys=False, allow_unicode=True)
    return f"---\n{HEADER_NOTE}\n{body}---\n"


def split_front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """(parsed header or None, the rest of the README)."""
    if not text.startswith("---\n"):
        return None, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return None, text
    return yaml.safe_load(text[4:end]) or {}, text[end + 5:]


def write_readme_header(readme: str | Path = README_FILE, settings: SpaceSettings | None = None) -> Path:
    readme, settings = Path(readme), settings or load_settings()
    _, rest = split_front_matter(readme.read_text(encoding="utf-8"))
    readme.write_text(front_matter_text(settings) + rest, encoding="utf-8")
    return readme


def readme_problems(readme: str | Path = README_FILE, settings: SpaceSettings | None = None) -> list[str]:
    """Differences between the README's front matter and spaces_config.yaml (empty when they agree)."""
    settings = settings or load_settings()
    header, _ = split_front_matter(Path(readme).read_text(encoding="utf-8"))
    if header is None:
        return ["README.md has no YAML front matter"]
    expected = front_matter(settings)
    problems = [f"{key}: README has {header.get(key)!r}, spaces_config.yaml says {value!r}"
                for key, value in expected.items() if header.get(key) != value]
    problems += [f"{key}: in README but not generated from spaces_config.yaml" for key in header
                 if key not in expected]
    return problems


# --- hosting defaults used by app.py ------------------------------------------------------------------------

def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def persistent_root(candidate: Path = PERSISTENT_ROOT) -> Path | None:
    """/data when the Space has persistent storage mounted and writable, else None."""
    return candidate if candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK) else None


def runs_root(default: str = "runs", candidate: Path = PERSISTENT_ROOT) -> str:
    """Where run folders (and the feedback database beside them) live: LORA_LAB_RUNS, else <persistent>/runs
    so they survive a Space restart, else the local folder."""
    if os.environ.get("LORA_LAB_RUNS"):
        return os.environ["LORA_LAB_RUNS"]
    persistent = persistent_root(candidate)
    return str(persistent / "runs") if persistent else default


def cache_env(candidate: Path = PERSISTENT_ROOT) -> dict[str, str]:
    """Model caches on persistent storage, so a restarted Space does not download the base model again."""
    persistent = persistent_root(candidate)
    if persistent is None:
        return {}
    return {"HF_HOME": str(persistent / "huggingface"), "LORA_LAB_CACHE": str(persistent / "lora-lab-cache")}


def default_preset(profile: HardwareProfile) -> str:
    """The preset the Train form opens with: a 1-2 B instruct model in 4-bit on a GPU with a T4's 16 GB or more,
    the embedded 135M model elsewhere (a 1.7B model is far too slow to train on a CPU)."""
    return "t4-qlora" if profile.is_cuda and profile.memory_gb >= 14 else "cpu-quick"


def server_host() -> str:
    """A Space routes traffic to 0.0.0.0:7860; locally the app stays on the loopback unless told otherwise."""
    return os.environ.get("LORA_LAB_HOST") or ("0.0.0.0" if on_space() else "127.0.0.1")


# --- the deployment plan ------------------------------------------------------------------------------------

@dataclass
class Step:
    action: str          # HfApi method name
    text: str            # what the plan prints (never a secret's value)
    kwargs: dict[str, Any]


def upload_files(root: Path = PROJECT_ROOT) -> list[str]:
    """The files the upload patterns select (walking only their top folders, never .venv or runs/)."""
    tops = {pattern.split("/")[0] for pattern in UPLOAD_PATTERNS}
    candidates = [p for top in sorted(tops) for p in ([root / top] + sorted((root / top).rglob("*"))
                                                      if (root / top).is_dir() else [root / top])]
    files = []
    for path in candidates:
        relative = path.relative_to(root).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in UPLOAD_PATTERNS) \
                and not any(fnmatch.fnmatch(relative, p) for p in IGNORE_PATTERNS):
            files.append(relative)
    return files


def _check_space_id(space_id: str) -> str:
    from finetune.core.models import HUB_ID

    if not HUB_ID.match(space_id or ""):
        raise DeployError(f"--space must look like USER/NAME, got {space_id!r}")
    return space_id


def plan(space_id: str, settings: SpaceSettings, env: dict[str, str] | None = None,
         root: Path = PROJECT_ROOT) -> list[Step]:
    """The API calls that create or update the Space, in order. Pure: no network, nothing sent."""
    space_id, env = _check_space_id(space_id), os.environ if env is None else env
    steps = [Step("create_repo", f"create the Space {space_id} if missing (sdk {settings.sdk} "
                                 f"{settings.sdk_version}, {'private' if settings.private else 'public'})",
                  {"repo_id": space_id, "repo_type": "space", "space_sdk": settings.sdk,
                   "private": settings.private, "exist_ok": True}),
             Step("request_space_hardware", f"request hardware {settings.hardware}",
                  {"repo_id": space_id, "hardware": settings.hardware})]
    if settings.storage_bucket:
        steps.append(Step("set_space_volumes", f"mount bucket {settings.storage_bucket} at /data",
                          {"repo_id": space_id, "bucket": settings.storage_bucket}))
    elif settings.persistent_storage:
        steps.append(Step("request_space_storage", f"request persistent storage '{settings.persistent_storage}' "
                                                   f"(mounted at /data){_storage_caveat()}",
                          {"repo_id": space_id, "storage": settings.persistent_storage}))
    for name in settings.secrets:
        if env.get(name):
            steps.append(Step("add_space_secret", f"set secret {name} from this machine's ${name} (value hidden)",
                              {"repo_id": space_id, "key": name, "value": env[name]}))
        else:
            steps.append(Step("skip", f"skip secret {name}: ${name} is not set here (add it in the Space settings)",
                              {}))
    for name, value in settings.variables.items():
        steps.append(Step("add_space_variable", f"set variable {name}={value}",
                          {"repo_id": space_id, "key": name, "value": value}))
    files = upload_files(root)
    steps.append(Step("upload_folder", f"upload {len(files)} files: {', '.join(_top_level(files))}",
                      {"repo_id": space_id, "repo_type": "space", "folder_path": str(root),
                       "allow_patterns": list(UPLOAD_PATTERNS), "ignore_patterns": list(IGNORE_PATTERNS),
                       "commit_message": "Deploy LoRA Lab"}))
    return steps


def _storage_caveat() -> str:
    """The dry run must not promise what the installed client cannot do (huggingface_hub 2.x dropped storage
    tiers for bucket volumes)."""
    from huggingface_hub import HfApi

    if hasattr(HfApi, "request_space_storage"):
        return ""
    return (f" - huggingface_hub {importlib.metadata.version('huggingface_hub')} cannot request a tier: "
            "enable it in the Space's settings, or set storage_bucket in spaces_config.yaml")


def _top_level(files: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for name in files:
        top = name.split("/")[0] + ("/" if "/" in name else "")
        counts[top] = counts.get(top, 0) + 1
    return [f"{top} ({n})" if top.endswith("/") else top for top, n in counts.items()]


def describe(steps: list[Step], space_id: str, dry_run: bool) -> str:
    head = f"Plan for Space {space_id}" + (" (dry run: nothing is sent)" if dry_run else "") + ":"
    return "\n".join([head] + [f"  {i}. {step.text}" for i, step in enumerate(steps, 1)])


def apply(steps: list[Step], api: Any, log: Any = print) -> None:
    """Carry out the plan with an HfApi (token from HF_TOKEN or the saved login)."""
    for step in steps:
        if step.action == "skip":
            continue
        log(f"- {step.text}")
        if step.action == "request_space_storage" and not hasattr(api, "request_space_storage"):
            log("  (this huggingface_hub has no storage-tier call: enable persistent storage in the Space's "
                "settings, or set storage_bucket in spaces_config.yaml)")
            continue
        if step.action == "set_space_volumes":
            from huggingface_hub import Volume

            api.set_space_volumes(step.kwargs["repo_id"], [Volume(type="bucket", source=step.kwargs["bucket"],
                                                                  mount_path=str(PERSISTENT_ROOT))])
            continue
        kwargs = dict(step.kwargs)
        getattr(api, step.action)(**kwargs)


# --- CLI ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.services.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--space", help="the Space to create or update, USER/NAME")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and send nothing")
    parser.add_argument("--settings", default=str(SETTINGS_FILE), help="spaces_config.yaml to use")
    parser.add_argument("--write-readme-header", action="store_true", help="regenerate README.md's front matter")
    parser.add_argument("--check-readme", action="store_true", help="exit 1 if README.md's front matter is stale")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.settings)
        if args.write_readme_header:
            print(f"wrote the front matter of {write_readme_header(README_FILE, settings)}")
        if args.check_readme:
            problems = readme_problems(README_FILE, settings)
            for problem in problems:
                print(f"error: README front matter: {problem}", file=sys.stderr)
            if problems:
                print("error: run `python -m finetune.services.deploy --write-readme-header`", file=sys.stderr)
                return 1
        if args.space:
            return _deploy(args.space, settings, args.dry_run)
        if not (args.write_readme_header or args.check_readme):
            print("error: nothing to do: pass --space USER/NAME [--dry-run], --write-readme-header or "
                  "--check-readme", file=sys.stderr)
            return 2
    except DeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _deploy(space_id: str, settings: SpaceSettings, dry_run: bool) -> int:
    problems = readme_problems(README_FILE, settings)
    if problems:
        raise DeployError("README.md's front matter disagrees with spaces_config.yaml ("
                          f"{problems[0]}); run `python -m finetune.services.deploy --write-readme-header` first")
    steps = plan(space_id, settings)
    print(describe(steps, space_id, dry_run))
    if dry_run:
        return 0
    from finetune.core.models import hub_reachable

    if not hub_reachable():
        raise DeployError("cannot reach the Hugging Face Hub from this machine (offline or HF_HUB_OFFLINE=1); "
                          "--dry-run shows the plan without it")
    from huggingface_hub import HfApi

    try:
        apply(steps, HfApi())
    except Exception as error:  # the Hub's refusals (no token, no rights) as one line
        from finetune.core.data import first_line  # here only: finetune.core.data imports `datasets`, slow for this CLI

        raise DeployError(f"the Hub refused: {type(error).__name__}: {first_line(error)}") from None
    print(f"done: https://huggingface.co/spaces/{space_id}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
