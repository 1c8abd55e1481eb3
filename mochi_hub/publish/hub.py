"""Push an export folder to the Hugging Face Hub: the only module that talks to the network.

    push(SOURCE, "org/name")     SOURCE: a run directory (its export, exported first when missing or
                                 older than the newest checkpoint) or an export folder

One commit (or one pull request) carries every file, so the repository holds all of them or none; the
remote file list and sizes are checked afterwards. Only huggingface_hub's public API is used. The token
comes from HF_TOKEN or the saved login (`hf auth login`) and is never printed or written anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from mochi_hub.publish.card import GENERATED_MARK, method_name, model_card_from_export
from mochi_hub.publish.export import CARD, CONFIG, CURVES, EXPORT_FILES, WEIGHTS, export_run
from mochi_hub.publish.sources import HUB, RUN, Source
from mochi_hub.training.checkpoint import checkpoint_step, latest_checkpoint
from mochi_hub.training.runs import default_export
from mochi_hub.version import __version__

# What an export holds; anything else (optimizer state, checkpoints, RNG files) needs --allow-extra.
ALLOWED_FILES = set(EXPORT_FILES) | {".gitattributes"}
SKIPPED_DIRS = {".git", ".cache"}  # .cache/huggingface is huggingface_hub's own upload cache


class PushError(RuntimeError):
    """A push that cannot or did not succeed; the message says why and what to do."""


@dataclass
class UploadFile:
    path_in_repo: str
    content: Path | bytes
    size: int


@dataclass
class PushResult:
    repo_id: str
    folder: Path
    files: list[UploadFile]
    exported: bool  # SOURCE was a run directory whose export had to be (re)written first
    dry_run: bool
    endpoint: str = ""
    url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    revision: str | None = None
    tag: str | None = None
    remote_extra: list[str] = field(default_factory=list)  # files already in the repo, not in this export

    @property
    def timm_name(self) -> str:
        return f"hf-hub:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def timm_line(self) -> str:
        return f'timm.create_model("{self.timm_name}", pretrained=True)'


# ------------------------------------------------------------------------------------------- source


def resolve_source(source: str | Path) -> tuple[Path, bool]:
    """SOURCE -> (export folder, whether it was exported now). Exports a run whose export is missing/stale."""
    try:
        parsed = Source.parse(source)
    except ValueError as error:
        raise PushError(str(error)) from None
    if parsed.kind == HUB:
        raise PushError(f"SOURCE {source}: already on the Hub; push takes a run directory or an export folder")
    if parsed.kind == RUN:
        export = default_export(parsed.path)
        latest = latest_checkpoint(parsed.path)
        if latest is None and not (export / WEIGHTS).is_file():
            raise PushError(
                f"{source} is a run without weights: no complete checkpoint and no export "
                f"({export.name}/{WEIGHTS}); nothing to push"
            )
        if latest is not None and _exported_step(export) != checkpoint_step(latest):
            export_run(parsed.path)  # offline; may raise ExportError (a ValueError) with its own message
            return export, True
        return export, False
    if not (parsed.path / WEIGHTS).is_file():
        raise PushError(f"{source} holds no weights ({WEIGHTS}): it is neither an export folder nor a run directory")
    return parsed.path, False


def _exported_step(export: Path) -> int | None:
    try:
        config = json.loads((export / CONFIG).read_text())
        return int(config["run"]["checkpoint_step"]) if (export / WEIGHTS).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_upload(
    folder: Path, repo_id: str, *, allow_extra: bool = False, license: str | None = None
) -> list[UploadFile]:
    """The files of one commit. The card is re-rendered with the repo id when it is ours; `license` replaces the
    export's in the uploaded config.json and card."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PushError(f"cannot read {folder / CONFIG}: {error}") from None
    if not isinstance(config, dict) or "architecture" not in config or "pretrained_cfg" not in config:
        raise PushError(
            f"{folder / CONFIG} is not in timm's shape (architecture, pretrained_cfg): re-export with `mochi export`"
        )
    files: list[UploadFile] = []
    extra: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] in SKIPPED_DIRS or (path.name.startswith(".") and path.name.endswith(".tmp")):
            continue
        name = relative.as_posix()
        if name not in ALLOWED_FILES:
            extra.append(name)
            if not allow_extra:
                continue
        files.append(UploadFile(name, path, path.stat().st_size))
    if extra and not allow_extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise PushError(
            f"{folder} holds files that are not part of an export: {shown}. Training state "
            "(optimizer, checkpoints) is never published by accident: move them out, or pass "
            "--allow-extra to upload them too"
        )
    if license:
        config["pretrained_cfg"]["license"] = license
        upload = next(f for f in files if f.path_in_repo == CONFIG)
        upload.content = (json.dumps(config, indent=2) + "\n").encode("utf-8")
        upload.size = len(upload.content)
    card = next((f for f in files if f.path_in_repo == CARD), None)
    if card is not None and GENERATED_MARK in Path(card.content).read_text(encoding="utf-8", errors="replace"):
        text = str(model_card_from_export(config, repo_id=repo_id, has_curves=(folder / CURVES).is_file()))
        card.content = text.encode("utf-8")
        card.size = len(card.content)
    return files


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"invalid --repo-id {repo_id!r}: {error}") from None
    if repo_id.count("/") != 1:
        raise PushError(
            f"invalid --repo-id {repo_id!r}: expected 'namespace/name' (a user or organisation, then the model's name)"
        )


# --------------------------------------------------------------------------------------------- push


def _is_connection_error(error: BaseException) -> bool:
    """A transport failure (connection refused or dropped, timeout), whatever HTTP library the client uses."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return type(error).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


def _http_message(error: HfHubHTTPError) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    server = getattr(error, "server_message", None) or ""
    return f"{status} {server}".strip() if status else str(error).splitlines()[0]


def push(
    source: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    tag: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    allow_extra: bool = False,
    license: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> PushResult:
    """Upload an export (or a run's export) to `repo_id` in one commit, then verify the remote files."""
    _check_repo_id(repo_id)
    if tag and create_pr:
        raise PushError("--tag cannot be combined with --create-pr: tag the commit once the pull request is merged")
    if revision is not None and not revision.strip():
        raise PushError("--revision must name a branch")
    folder, exported = resolve_source(source)
    if exported:
        log(f"exported the newest checkpoint to {folder}")
    files = plan_upload(folder, repo_id, allow_extra=allow_extra, license=license)
    if not any(f.path_in_repo == WEIGHTS for f in files):
        raise PushError(f"{folder} holds no {WEIGHTS}: nothing to push")
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    result = PushResult(
        repo_id=repo_id,
        folder=folder,
        files=files,
        exported=exported,
        dry_run=dry_run,
        endpoint=endpoint,
        revision=revision,
        tag=tag,
    )
    if dry_run:
        return result

    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: nothing can be pushed (unset it, or use --dry-run)")
    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN, or run `hf auth login`, with a token that may "
            f"write to {repo_id.split('/')[0]}"
        )
    api = HfApi(endpoint=endpoint, token=token, library_name="mochi-hub", library_version=__version__)
    config = json.loads((folder / CONFIG).read_text())
    method = config.get("method", method_name(config.get("mochi", (0, 0, 0))))  # None: an import that does not say
    message = commit_message or (
        f"Upload {config.get('architecture')} {method + ' ' if method else ''}backbone (mochi-hub {__version__})"
    )
    stage = "checking the token"
    try:
        try:
            user = api.whoami().get("name", "?")
        except HfHubHTTPError as error:
            if getattr(error.response, "status_code", None) == 401:
                raise PushError(
                    f"{endpoint} rejected the token (401 Unauthorized): check HF_TOKEN or `hf auth login`"
                ) from None
            raise
        stage = "creating the repository"
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION and not create_pr:
            stage = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        stage = "uploading"
        log(f"uploading {len(files)} files to {repo_id} as {user}")
        commit = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.content) for f in files],
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
        if tag:
            stage = f"tagging the commit {tag}"
            api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=message)
        stage = "verifying the upload"
        remote = {
            f.path: f.size
            for f in api.list_repo_tree(repo_id, recursive=True, revision=commit.oid)
            if isinstance(f, RepoFile)
        }
    except PushError:
        raise
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        what = _http_message(error)
        committed = stage.startswith(("tagging", "verifying"))
        suffix = "" if committed else "; nothing was committed"
        if status in (401, 403):
            raise PushError(f"the token may not write to {repo_id} ({what}) while {stage}{suffix}") from None
        if status == 404 and revision and not committed:
            raise PushError(f"{repo_id} has no branch {revision!r} ({what}) while {stage}{suffix}") from None
        raise PushError(f"the Hub refused the push while {stage}: {what}{suffix}") from None
    except Exception as error:
        if not _is_connection_error(error):
            raise
        detail = f"{type(error).__name__}: {error}".strip().rstrip(":")
        if stage.startswith(("tagging", "verifying")):
            after = f"the commit {commit.oid} was made; check {endpoint}/{repo_id} and tag or verify it again"
        elif stage != "uploading":
            after = "nothing was committed; run the same command again"
        else:
            after = (
                f"a commit is atomic, so {repo_id} holds all of this export's files or none of them; run the "
                "same command again (unchanged files are skipped)"
            )
        raise PushError(f"lost the connection to {endpoint} while {stage} ({detail}): {after}") from None

    wrong = [
        f"{f.path_in_repo} (local {f.size} B, remote {remote.get(f.path_in_repo, 'missing')})"
        for f in files
        if remote.get(f.path_in_repo) != f.size
    ]
    if wrong:
        raise PushError(f"verification failed, the remote files differ from the export: {', '.join(wrong)}")
    result.commit_oid = commit.oid
    result.remote_extra = sorted(set(remote) - {f.path_in_repo for f in files} - {".gitattributes"})
    if create_pr:
        result.pr_url = commit.pr_url
        result.revision = commit.pr_revision
        result.url = commit.pr_url
    else:
        base = str(repo_url).rstrip("/") or f"{endpoint}/{repo_id}"
        result.url = base if not revision or revision == constants.DEFAULT_REVISION else f"{base}/tree/{revision}"
    return result
