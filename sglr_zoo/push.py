"""Uploading a model folder to the Hugging Face Hub (`sglr-zoo push`), its visibility stated before anything is
sent."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from sglr_zoo.errors import UserError
from sglr_zoo.export import export_folder, listing
from sglr_zoo.models import sha256_of
from sglr_zoo.results import Results
from sglr_zoo.rundir import ModelFolder, RunDir
from sglr_zoo.zoo import network_errors

__all__ = ["Upload", "check_target", "push", "upload_folder"]


class Upload(NamedTuple):
    """What `push` sent (or, for a dry run, would send)."""

    files: list[tuple[str, int]]  # path in the repo, size in bytes
    sha256: str  # of model.safetensors
    url: str | None  # commit or pull-request URL; None for a dry run
    private: bool  # the repo's visibility (for a dry run: the visibility a new repo would get)
    commit: str | None = None  # the commit's id, to pin as a zoo entry's revision; None for a dry run
    config_sha256: str | None = None  # of config.json, which a zoo entry pins beside the weights' sha256


def push(run_or_folder: str | Path, repo_id: str, *, which: str | None = None,
         results: str | Path | dict[str, Any] | Results | None = None, private: bool = False,
         revision: str | None = None, create_pr: bool = False, dry_run: bool = False,
         commit_message: str | None = None, announce: Callable[[str], None] = print) -> Upload:
    """Exports the checkpoint with its card and uploads the folder to the Hub repo `repo_id`.

    The token comes from HF_TOKEN or `hf auth login`. `dry_run` lists the files and uploads nothing. Before any
    upload, `announce` is told whether the repo is public (the default for a new repo) or private; `private`
    refuses an existing public repo rather than publish into it.
    """
    check_target(repo_id, revision, create_pr)
    with tempfile.TemporaryDirectory(prefix="sglr_zoo_push_") as tmp:
        folder = export_folder(run_or_folder, Path(tmp) / "export", which=which, results=results, repo_id=repo_id)
        return upload_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr, dry_run=dry_run,
                       commit_message=commit_message or f"Upload {_folder_name(run_or_folder)}"
                       + (f" ({which})" if which else ""),
                       announce=announce)


def check_target(repo_id: str, revision: str | None, create_pr: bool) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UserError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    if create_pr and revision not in (None, "main"):
        raise UserError("--create-pr opens a pull request against main; drop --revision or --create-pr")


def upload_folder(folder: Path, repo_id: str, *, private: bool, revision: str | None, create_pr: bool, dry_run: bool,
            commit_message: str, announce: Callable[[str], None]) -> Upload:
    """Uploads a model folder to `repo_id` (creating the repo), or for a dry run only lists it."""
    files = listing(folder)
    sha256, config_sha256 = sha256_of(ModelFolder(folder).weights), sha256_of(ModelFolder(folder).config)
    if dry_run:
        announce(f"dry run: {repo_id} would be {_visibility(private)} if this push created it "
                 + ("(--private)" if private else "(pass --private for a private repo)"))
        return Upload(files, sha256, None, private, config_sha256=config_sha256)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        is_private = bool(api.repo_info(repo_id).private)  # an existing repo keeps its own visibility
        if private and not is_private:
            raise UserError(f"--private: {repo_id} already exists and is public; nothing was uploaded. Make it "
                            "private on the Hub first, or push to a new repo")
        announce(f"uploading to {repo_id}: {_visibility(is_private)}")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = (" Log in with `hf auth login` or set HF_TOKEN to a token with write access."
                if status in (401, 403) else "")
        raise UserError(f"push to {repo_id} failed: {str(error).splitlines()[0]}.{hint}") from None
    except network_errors() as error:
        raise UserError(f"push to {repo_id} failed: cannot reach the Hub ({error})") from None
    return Upload(files, sha256, info.pr_url or info.commit_url, is_private, info.oid, config_sha256)


def _visibility(private: bool) -> str:
    return "a private repo" if private else "a PUBLIC repo: anyone can download these weights and files"


def _folder_name(path: str | Path) -> str:
    """`run/best` for a run's export, else the folder's name (no local path goes into a commit message)."""
    path = Path(path).resolve()
    return f"{path.parent.name}/{path.name}" if RunDir.of_export(path) else path.name
