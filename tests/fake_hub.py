"""huggingface_hub.HfApi at the network boundary: records what would be sent and keeps each repo's files; an
uploaded folder is then in the hub cache as a download would leave it, so its hub id loads offline."""

from __future__ import annotations

import hashlib
import shutil
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import constants


class FakeHfApi:
    calls: list = []
    repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": set of paths}
    commits: dict[str, str] = {}  # repo id -> the commit of its last upload

    def __init__(self, token=None):
        self.calls.append(("token", token))

    @classmethod
    def reset(cls) -> None:
        cls.calls, cls.repos, cls.commits = [], {}, {}

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private))
        # A new repo starts with .gitattributes, private if asked, else as the account's default (public here).
        self.repos.setdefault(repo_id, {"private": bool(private), "files": {".gitattributes"}})

    def update_repo_settings(self, repo_id, private=None, repo_type=None):
        self.calls.append(("update_repo_settings", repo_id, private))
        self.repos[repo_id]["private"] = private

    def create_branch(self, repo_id, branch, exist_ok=False, repo_type=None):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(
        self,
        repo_id,
        folder_path,
        repo_type=None,
        revision=None,
        create_pr=None,
        commit_message=None,
        delete_patterns=None,
    ):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", repo_id, sorted(files), revision, create_pr, commit_message))
        patterns = [delete_patterns] if isinstance(delete_patterns, str) else delete_patterns or []
        remote = self.repos[repo_id]["files"]
        # As the Hub does: matching remote files are deleted in the same commit, .gitattributes never.
        kept = {f for f in remote if f == ".gitattributes" or not any(fnmatch(f, p) for p in patterns)}
        self.repos[repo_id]["files"] = kept | files
        self.commits[repo_id] = download(repo_id, folder)


def download(repo_id: str, folder: Path) -> str:
    """Lay `folder` in the hub cache as the snapshot of `repo_id`'s main branch (what `snapshot_download` leaves),
    so `from_pretrained(repo_id)` reads it under HF_HUB_OFFLINE; returns the commit id."""
    commit = hashlib.sha1(repo_id.encode() + b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()))
    commit = commit.hexdigest()
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit
