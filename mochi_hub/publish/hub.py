"""Push an export folder to the Hugging Face Hub: the only module that talks to the network.

    push(SOURCE, "org/name")     SOURCE: a run directory (its export, exported first when missing, older than the
                                 newest checkpoint, or without the run's newest probe and detect results) or an
                                 export folder

    plan_push    what to upload, checked offline (files, the card rendered for the repo id, the commit message)
    commit       one commit (or one pull request) carrying every file, so the repository holds all or none
    verify       the remote file list and sizes against the plan

Only huggingface_hub's public API is used, and its error types say what went wrong (`hub_errors`). The token
comes from HF_TOKEN or the saved login (`hf auth login`) and is never printed or written anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from mochi_hub.errors import OptionError, UserError
from mochi_hub.publish.card import GENERATED_MARK, method_name, model_card_from_export, redact_local_paths
from mochi_hub.publish.export import CARD, CONFIG, CURVES, EXPORT_FILES, WEIGHTS, export_run
from mochi_hub.publish.sources import HUB, RUN, Source
from mochi_hub.training.checkpoint import checkpoint_step, latest_checkpoint
from mochi_hub.training.runs import DETECTION, PROBES, default_export, read_results
from mochi_hub.version import __version__

# What an export holds; anything else (optimizer state, checkpoints, RNG files) needs --allow-extra.
ALLOWED_FILES = set(EXPORT_FILES) | {".gitattributes"}
SKIPPED_DIRS = {".git", ".cache"}  # .cache/huggingface is huggingface_hub's own upload cache


class PushError(UserError):
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
    changed: bool = True  # False: the branch already held these files; no commit (and no pull request) was made

    @property
    def timm_name(self) -> str:
        return f"hf-hub:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def timm_line(self) -> str:
        return f'timm.create_model("{self.timm_name}", pretrained=True)'


# ------------------------------------------------------------------------------------------- source


def resolve_source(source: str | Path) -> tuple[Path, bool]:
    """SOURCE -> (export folder, whether it was exported now). Exports a run whose export is missing/stale."""
    parsed = Source.parse(source)
    if parsed.kind == HUB:
        raise OptionError(f"SOURCE {source}: already on the Hub; push takes a run directory or an export folder")
    if parsed.kind == RUN:
        export = default_export(parsed.path)
        latest = latest_checkpoint(parsed.path)
        if latest is None and not (export / WEIGHTS).is_file():
            raise PushError(
                f"{source} is a run without weights: no complete checkpoint and no export "
                f"({export.name}/{WEIGHTS}); nothing to push"
            )
        if latest is not None and not _export_is_current(parsed.path, export, checkpoint_step(latest)):
            export_run(parsed.path)  # offline; may raise ExportError (a ValueError) with its own message
            return export, True
        return export, False
    if not (parsed.path / WEIGHTS).is_file():
        raise PushError(f"{source} holds no weights ({WEIGHTS}): it is neither an export folder nor a run directory")
    return parsed.path, False


def _export_is_current(run_dir: Path, export: Path, step: int) -> bool:
    """Whether the run's export holds its newest checkpoint and, for the card, the probe and detect results the run
    keeps now (a result kept after the export, or one deleted since, makes it stale)."""
    try:
        config = json.loads((export / CONFIG).read_text())
        exported_step = int(config["run"]["checkpoint_step"]) if (export / WEIGHTS).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return False
    kept = {
        "probe_results": redact_local_paths(read_results(run_dir, PROBES)),
        "detection_results": redact_local_paths(read_results(run_dir, DETECTION)),
    }
    return exported_step == step and all(config.get(key, []) == results for key, results in kept.items())


def plan_upload(
    folder: Path, repo_id: str, *, allow_extra: bool = False, license: str | None = None
) -> list[UploadFile]:
    """The files of one commit, the card rendered for the repo id when it is ours; `license` replaces the export's
    in the uploaded config.json and card."""
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
    return [render_card(f, folder, config, repo_id) if f.path_in_repo == CARD else f for f in files]


def render_card(card: UploadFile, folder: Path, config: dict[str, Any], repo_id: str) -> UploadFile:
    """Our card (it carries GENERATED_MARK) rendered again with the repo id in its usage lines; a card the user
    wrote is uploaded as it is."""
    if GENERATED_MARK not in Path(card.content).read_text(encoding="utf-8", errors="replace"):
        return card
    text = str(model_card_from_export(config, repo_id=repo_id, has_curves=(folder / CURVES).is_file()))
    return UploadFile(card.path_in_repo, text.encode("utf-8"), len(text.encode("utf-8")))


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise OptionError(f"invalid --repo-id {repo_id!r}: {error}") from None
    if repo_id.count("/") != 1:
        raise OptionError(
            f"invalid --repo-id {repo_id!r}: expected 'namespace/name' (a user or organisation, then the model's name)"
        )


# --------------------------------------------------------------------------------------------- push


@dataclass
class PushPlan:
    """One push, checked offline: where from, where to, what, and how it is committed."""

    result: PushResult
    message: str
    private: bool
    create_pr: bool

    @property
    def branch(self) -> str | None:
        """The branch to create first: --revision when it is not the default one and no pull request is opened."""
        revision = self.result.revision
        return revision if revision and revision != constants.DEFAULT_REVISION and not self.create_pr else None


def plan_push(
    source: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    tag: str | None = None,
    commit_message: str | None = None,
    allow_extra: bool = False,
    license: str | None = None,
    endpoint: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> PushPlan:
    """Everything a push decides before the network: the options, SOURCE (a stale export is redone), the files."""
    _check_repo_id(repo_id)
    if tag and create_pr:
        raise OptionError("--tag cannot be combined with --create-pr: tag the commit once the pull request is merged")
    if revision is not None and not revision.strip():
        raise OptionError("--revision must name a branch")
    folder, exported = resolve_source(source)
    if exported:
        log(f"exported the newest checkpoint to {folder}")
    files = plan_upload(folder, repo_id, allow_extra=allow_extra, license=license)
    if not any(f.path_in_repo == WEIGHTS for f in files):
        raise PushError(f"{folder} holds no {WEIGHTS}: nothing to push")
    config = json.loads((folder / CONFIG).read_text())
    method = config.get("method", method_name(config.get("mochi", (0, 0, 0))))  # None: an import that does not say
    message = commit_message or (
        f"Upload {config.get('architecture')} {method + ' ' if method else ''}backbone (mochi-hub {__version__})"
    )
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    result = PushResult(repo_id, folder, files, exported, False, endpoint=endpoint, revision=revision, tag=tag)
    return PushPlan(result, message, private, create_pr)


def _is_connection_error(error: BaseException) -> bool:
    """A transport failure (connection refused or dropped, timeout), whatever HTTP library the client uses."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return type(error).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


@contextmanager
def hub_errors(plan: PushPlan, doing: str, *, committed: str | None = None) -> Iterator[None]:
    """huggingface_hub's errors, by type, as one PushError each: what was being done, and whether the commit
    (`committed`: its id) was made."""
    r = plan.result
    after = f"the commit {committed} was made" if committed else "nothing was committed"
    try:
        yield
    except RevisionNotFoundError as error:
        raise PushError(
            f"{r.repo_id} has no branch {r.revision!r} ({_http_message(error)}) while {doing}; {after}"
        ) from None
    except RepositoryNotFoundError as error:
        raise PushError(
            f"{r.repo_id} was not found, or the token may not see it ({_http_message(error)}) while {doing}; {after}"
        ) from None
    except HfHubHTTPError as error:
        what = _http_message(error)
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise PushError(f"{r.endpoint} rejected the token ({what}): check HF_TOKEN or `hf auth login`") from None
        if status == 403:
            raise PushError(f"the token may not write to {r.repo_id} ({what}) while {doing}; {after}") from None
        raise PushError(f"the Hub refused the push while {doing}: {what}; {after}") from None
    except Exception as error:
        if not _is_connection_error(error):
            raise
        detail = f"{type(error).__name__}: {error}".strip().rstrip(":")
        if committed:
            after += f"; check {r.endpoint}/{r.repo_id} and tag or verify it again"
        elif doing == "uploading":
            after = (
                f"a commit is atomic, so {r.repo_id} holds all of this export's files or none of them; run the "
                "same command again (unchanged files are skipped)"
            )
        else:
            after += "; run the same command again"
        raise PushError(f"lost the connection to {r.endpoint} while {doing} ({detail}): {after}") from None


def _http_message(error: HfHubHTTPError) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    server = getattr(error, "server_message", None) or ""
    return f"{status} {server}".strip() if status else str(error).splitlines()[0]


def _client(plan: PushPlan, token: str | None) -> HfApi:
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: nothing can be pushed (unset it, or use --dry-run)")
    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN, or run `hf auth login`, with a token that may "
            f"write to {plan.result.repo_id.split('/')[0]}"
        )
    return HfApi(endpoint=plan.result.endpoint, token=token, library_name="mochi-hub", library_version=__version__)


def commit(api: HfApi, plan: PushPlan, log: Callable[[str], None]) -> tuple[CommitInfo, str, bool]:
    """The repository (and branch) made if missing, every file in one commit, the tag: (commit, repository URL,
    whether anything changed: huggingface_hub skips a commit whose files the branch already holds)."""
    r = plan.result
    with hub_errors(plan, "checking the token"):
        user = api.whoami().get("name", "?")
    with hub_errors(plan, "creating the repository"):
        repo_url = api.create_repo(r.repo_id, private=plan.private, exist_ok=True, repo_type="model")
    if plan.branch:
        with hub_errors(plan, f"creating branch {plan.branch}"):
            api.create_branch(r.repo_id, branch=plan.branch, exist_ok=True)
    with hub_errors(plan, "reading the branch"):
        head = api.repo_info(r.repo_id, revision=r.revision or constants.DEFAULT_REVISION).sha
    log(f"uploading {len(r.files)} files to {r.repo_id} as {user}")
    with hub_errors(plan, "uploading"):
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.content) for f in r.files]
        done = api.create_commit(
            r.repo_id, operations, commit_message=plan.message, revision=r.revision, create_pr=plan.create_pr
        )
    if r.tag:
        with hub_errors(plan, f"tagging the commit {r.tag}", committed=done.oid):
            api.create_tag(r.repo_id, tag=r.tag, revision=done.oid, tag_message=plan.message)
    return done, str(repo_url), done.oid != head


def verify(api: HfApi, plan: PushPlan, done: CommitInfo) -> list[str]:
    """Raise unless every planned file is in the commit with its size; returns the files the repository holds
    beyond them (from earlier pushes)."""
    r = plan.result
    with hub_errors(plan, "verifying the upload", committed=done.oid):
        tree = api.list_repo_tree(r.repo_id, recursive=True, revision=done.oid)
        remote = {f.path: f.size for f in tree if isinstance(f, RepoFile)}
    wrong = [
        f"{f.path_in_repo} (local {f.size} B, remote {remote.get(f.path_in_repo, 'missing')})"
        for f in r.files
        if remote.get(f.path_in_repo) != f.size
    ]
    if wrong:
        raise PushError(f"verification failed, the remote files differ from the export: {', '.join(wrong)}")
    return sorted(set(remote) - {f.path_in_repo for f in r.files} - {".gitattributes"})


def push(
    source: str | Path,
    repo_id: str,
    *,
    dry_run: bool = False,
    token: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    **options: Any,
) -> PushResult:
    """Upload an export (or a run's export) to `repo_id` in one commit, then verify the remote files. `options`:
    plan_push's (private, create_pr, revision, tag, commit_message, allow_extra, license, endpoint); `dry_run`: plan
    only."""
    plan = plan_push(source, repo_id, log=log, **options)
    result = plan.result
    result.dry_run = dry_run
    if dry_run:
        return result
    api = _client(plan, token)
    done, repo_url, result.changed = commit(api, plan, log)
    result.remote_extra = verify(api, plan, done)
    result.commit_oid = done.oid
    if plan.create_pr and result.changed:
        result.pr_url = result.url = done.pr_url
        result.revision = done.pr_revision
    else:
        base = repo_url.rstrip("/") or f"{result.endpoint}/{repo_id}"
        revision = result.revision
        result.url = base if not revision or revision == constants.DEFAULT_REVISION else f"{base}/tree/{revision}"
    return result
