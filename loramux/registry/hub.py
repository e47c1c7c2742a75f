"""The Hugging Face Hub-compatible routes: what the stock `huggingface_hub` client calls to create repos, upload
(preupload, LFS batch + signed PUT, NDJSON commit), list (repo info, tree, commits) and download (resolve with
ranges). `hub_router(registry)` is included by the serving app; `create_hub_app()` serves it alone."""

# No `from __future__ import annotations`: FastAPI must see the route signatures' real types (`Who` is local).
import base64
import binascii
import io
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from loramux import __version__
from loramux.core.adapter_config import CONFIG_FILE
from loramux.registry.blobs import BlobError
from loramux.registry.http import (
    HubHTTPError,
    HubRoute,
    UploadSigner,
    bearer_token,
    endpoint_of,
    file_response,
    iso_date,
)
from loramux.registry.names import MAIN, SHA256, check_file_path, check_part
from loramux.registry.registry import AddFile, Caller, CommitError, DeleteFile, Registry, RepoView
from loramux.registry.store import FileEntry, Repo, RepoExistsError, Revision
from loramux.registry.xet import CAS_PREFIX, XetTokens, token_response, xet_router

LFS_THRESHOLD = 1 << 20  # files from 1 MiB travel through the LFS batch upload, never base64 inside the commit
MAX_COMMIT_BODY = 256 << 20
LFS_POINTER_SIZE = 134


def hub_router(registry: Registry, signer: UploadSigner | None = None) -> APIRouter:
    router = APIRouter(route_class=HubRoute)
    signer = signer or UploadSigner(registry.secret)
    xet_tokens = XetTokens(registry.secret)
    router.include_router(xet_router(registry, xet_tokens))

    def caller(request: Request) -> Caller:
        return registry.caller(bearer_token(request))

    Who = Annotated[Caller, Depends(caller)]
    _add_repo_routes(router, registry, Who)
    _add_browse_routes(router, registry, Who)
    _add_upload_routes(router, registry, Who, signer, xet_tokens)
    _add_write_routes(router, registry, Who, signer)
    _add_download_routes(router, registry, Who)
    return router


# Each function below adds one group of routes; `Who` is the caller dependency of `hub_router`'s registry. The order
# of the groups is the order the routes are matched in.


def _add_repo_routes(router: APIRouter, registry: Registry, Who: Any) -> None:
    """Create, delete and configure repos; who the caller is."""

    @router.post("/api/repos/create")
    def create_repo(request: Request, body: dict, who: Who) -> JSONResponse:
        if body.get("type") not in (None, "model"):
            raise HubHTTPError(400, f"only model repos are hosted here, not {body.get('type')!r}")
        name, namespace = body.get("name"), body.get("organization") or who.tenant
        if not isinstance(name, str) or not namespace:
            raise HubHTTPError(400, "name the repo as namespace/name")
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
        repo_id = f"{namespace}/{name}"
        url = f"{endpoint_of(request)}/{repo_id}"
        try:
            registry.create_repo(repo_id, who, private=private)
        except RepoExistsError:
            registry.repo(repo_id, who)  # a repo the caller may not read answers like a missing one would
            return JSONResponse({"error": f"repository {repo_id} already exists", "url": url}, status_code=409)
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    @router.delete("/api/repos/delete")
    def delete_repo(body: dict, who: Who) -> dict:
        if body.get("type") not in (None, "model"):
            raise HubHTTPError(400, "only model repos are hosted here")
        registry.delete_repo(f"{body.get('organization') or who.tenant}/{body.get('name')}", who)
        return {}

    @router.put("/api/repos/models/{ns}/{name}/settings")
    def repo_settings(ns: str, name: str, body: dict, who: Who) -> dict:
        private = body.get("visibility") == "private" if "visibility" in body else body.get("private")
        if private is not None:
            registry.set_private(f"{ns}/{name}", who, bool(private))
        return {}

    @router.post("/api/validate-yaml")
    def validate_yaml() -> dict:
        return {}  # model cards are stored as given

    @router.get("/api/whoami-v2")
    def whoami(who: Who) -> dict:
        if who.tenant is None and not who.local:
            raise HubHTTPError(401, "no token given")
        name = who.tenant or "local"
        orgs = [{"name": ns} for ns in registry.store.namespaces_of(name) if ns != name] if who.tenant else []
        return {"type": "user", "name": name, "fullname": name, "orgs": orgs, "auth": {"type": "access_token"}}


def _add_browse_routes(router: APIRouter, registry: Registry, Who: Any) -> None:
    """List repos, a repo's info, its file tree and its commits."""

    @router.get("/api/models")
    def list_models(who: Who, author: str | None = None, search: str | None = None) -> list:
        views = registry.list_repos(who, namespace=check_part(author, "namespace") if author else None)
        return [_info(registry, v.repo, v.head, None) for v in views if not search or search in v.repo.repo_id]

    @router.get("/api/models/{ns}/{name}")
    @router.get("/api/models/{ns}/{name}/revision/{rev}")
    def model_info(request: Request, ns: str, name: str, who: Who, rev: str | None = None):
        repo = registry.repo(f"{ns}/{name}", who)
        head = registry.store.head(repo, MAIN)
        revision = registry.revision(repo, rev) if rev is not None or head is not None else None
        return _info(registry, repo, revision, endpoint_of(request))

    @router.get("/api/models/{ns}/{name}/tree/{rev}")
    @router.get("/api/models/{ns}/{name}/tree/{rev}/{path:path}")
    def tree(ns: str, name: str, rev: str, who: Who, path: str = "", recursive: bool = False):
        revision = registry.revision(registry.repo(f"{ns}/{name}", who), rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for entry in registry.files(revision):
            if not entry.path.startswith(prefix):
                continue
            parts = entry.path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if depth == 1 or recursive:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(_tree_file(entry))
        if prefix and not entries and not folders:
            raise HubHTTPError(404, f"{path} not found in revision {revision.commit}", "EntryNotFound")
        return [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)] + entries

    @router.get("/api/models/{ns}/{name}/commits/{rev}")
    def commits(ns: str, name: str, rev: str, who: Who) -> list:
        repo = registry.repo(f"{ns}/{name}", who)
        newest = registry.revision(repo, rev)
        history = registry.store.list_revisions(repo)
        start = next(i for i, r in enumerate(history) if r.commit == newest.commit)
        return [
            {"id": r.commit, "title": r.message.split("\n", 1)[0], "message": r.message,
             "authors": [{"user": repo.namespace}], "date": iso_date(r.created_at)}
            for r in history[start:]
        ]  # fmt: skip


def _add_upload_routes(
    router: APIRouter, registry: Registry, Who: Any, signer: UploadSigner, xet_tokens: XetTokens
) -> None:
    """What to upload and where: preupload, Xet tokens and the LFS batch that signs upload URLs."""

    @router.post("/api/models/{ns}/{name}/preupload/{rev}")
    def preupload(ns: str, name: str, rev: str, body: dict, who: Who) -> dict:
        repo = _writable(registry, f"{ns}/{name}", who)
        _check_branch(rev)
        head = registry.store.head(repo, MAIN)
        existing = {e.path: e for e in registry.files(head)} if head else {}
        answer = []
        for item in body.get("files") or []:
            path, size = check_file_path(item.get("path")), int(item.get("size") or 0)
            lfs = size >= LFS_THRESHOLD
            oid = existing[path].sha256 if lfs and path in existing else None
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": answer}

    @router.get("/api/models/{ns}/{name}/xet-{scope}-token/{rev}")
    def xet_token(request: Request, ns: str, name: str, scope: str, rev: str, who: Who) -> JSONResponse:
        # huggingface_hub >= 1.20 with hf_xet installed uploads every LFS file through Xet (registry/xet.py).
        if scope not in ("read", "write"):
            raise HubHTTPError(404, f"no Xet {scope!r} token: ask for read or write")
        repo = _writable(registry, f"{ns}/{name}", who) if scope == "write" else registry.repo(f"{ns}/{name}", who)
        if scope == "write":
            _check_branch(rev)
        cas_url = f"{endpoint_of(request)}{CAS_PREFIX}/{registry.xorbs.store_id}"
        body, headers = token_response(xet_tokens, cas_url, repo.namespace, scope == "write")
        return JSONResponse(body, headers=headers)

    @router.post("/{ns}/{name}.git/info/lfs/objects/batch")
    def lfs_batch(request: Request, ns: str, name: str, body: dict, who: Who) -> JSONResponse:
        _writable(registry, f"{ns}/{name}", who)
        if body.get("operation") != "upload":
            raise HubHTTPError(400, "only LFS uploads are supported; download files through /resolve/")
        objects = []
        for obj in body.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not SHA256.fullmatch(oid) or not isinstance(size, int) or size < 0:
                raise HubHTTPError(400, f"malformed LFS object {obj!r}: expected a sha256 oid and a size")
            if size > registry.limits.max_model_file_bytes:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "file too large"}})
            elif _intact(registry, oid):
                objects.append({"oid": oid, "size": size})  # already stored: nothing to upload
            else:
                expires, sig = signer.sign(oid, size)
                href = f"{endpoint_of(request)}/api/lfs/upload/{oid}?size={size}&expires={expires}&sig={sig}"
                upload = {"href": href, "header": {}, "expires_in": signer.ttl}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload}})
        return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")


def _add_write_routes(router: APIRouter, registry: Registry, Who: Any, signer: UploadSigner) -> None:
    """The uploaded bytes (a signed LFS PUT) and the commit that records files as a new revision."""

    @router.put("/api/lfs/upload/{oid}")
    async def lfs_upload(request: Request, oid: str, size: int, expires: int, sig: str) -> dict:
        if not signer.check(oid, size, expires, sig):
            raise HubHTTPError(403, "upload URL is invalid or expired: ask the LFS batch endpoint for a new one")
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > size:
                    raise HubHTTPError(400, f"upload is larger than the announced {size} bytes")
                spool.write(chunk)
            if received != size:
                raise HubHTTPError(400, f"upload has {received} bytes, {size} were announced (interrupted?)")
            spool.seek(0)
            try:
                await run_in_threadpool(registry.store_blob, spool, oid, size)
            except ValueError as exc:
                raise HubHTTPError(400, str(exc)) from exc
        return {}

    @router.post("/api/models/{ns}/{name}/commit/{rev}")
    async def commit(request: Request, ns: str, name: str, rev: str, who: Who) -> dict:
        _check_branch(rev)
        await run_in_threadpool(_writable, registry, f"{ns}/{name}", who)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_COMMIT_BODY:
                raise HubHTTPError(413, "commit too large: send files from 1 MiB through the LFS batch upload")
        revision = await run_in_threadpool(_commit, registry, f"{ns}/{name}", who, bytes(body))
        url = f"{endpoint_of(request)}/{ns}/{name}/commit/{revision.commit}"
        return {"success": True, "commitOid": revision.commit, "commitUrl": url, "pullRequestUrl": None}


def _add_download_routes(router: APIRouter, registry: Registry, Who: Any) -> None:
    """Files of a revision, whole or by range (GET), or their headers alone (HEAD)."""

    @router.api_route("/{ns}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
    def resolve(request: Request, ns: str, name: str, rev: str, path: str, who: Who):
        repo = registry.repo(f"{ns}/{name}", who)
        revision = registry.revision(repo, rev)
        entry = registry.file(revision, path)
        headers = {
            "X-Repo-Commit": revision.commit,
            "ETag": f'"{entry.sha256}"',
            "X-Linked-Etag": f'"{entry.sha256}"',
            "X-Linked-Size": str(entry.size),
        }
        head = request.method == "HEAD"
        # GET streams only content that still matches its sha256; HEAD reads no content.
        blob = None if head else registry.blob_path(entry)
        return file_response(blob, entry.size, headers, request.headers.get("range"), head)


def create_hub_app(registry: Registry | None = None, data_dir: Path | None = None) -> FastAPI:
    """The hub alone (what `loramux hub` serves)."""
    app = FastAPI(title="loramux hub", version=__version__)
    app.include_router(hub_router(registry or Registry.open(data_dir)))
    return app


def _writable(registry: Registry, repo_id: str, who: Caller) -> Repo:
    repo = registry.repo(repo_id, who)
    registry.check_write(repo.namespace, who)
    return repo


def _check_branch(rev: str) -> None:
    if rev != MAIN:
        raise HubHTTPError(400, f"commits go to branch {MAIN!r}, not {rev!r}", "RevisionNotFound")


def _commit(registry: Registry, repo_id: str, who: Caller, body: bytes) -> Revision:
    """Parse the client's NDJSON commit (a header line, then one line per file operation) and record it."""
    header, operations = None, []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HubHTTPError(400, f"commit line {number} is not a valid operation") from exc
        if key == "header":
            header = value
        elif key == "file":
            path = check_file_path(value.get("path"))
            if value.get("encoding", "base64") != "base64":
                raise HubHTTPError(400, f"{path}: only base64 file content is supported")
            try:
                content = base64.b64decode(value.get("content", ""), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise HubHTTPError(400, f"{path}: content is not valid base64") from exc
            sha, size = registry.store_blob(io.BytesIO(content))
            operations.append(AddFile(path, sha, size))
        elif key == "lfsFile":
            path, oid = check_file_path(value.get("path")), value.get("oid")
            if not isinstance(oid, str) or not SHA256.fullmatch(oid) or not registry.blobs.exists(oid):
                raise CommitError(f"{path}: its content (sha256 {oid}) was never uploaded; upload it through LFS")
            size = registry.blob_path(FileEntry(path, oid, 0)).stat().st_size
            if value.get("size") not in (None, size):
                raise CommitError(f"{path}: declared size {value.get('size')} but the upload has {size} bytes")
            operations.append(AddFile(path, oid, size))
        elif key in ("deletedFile", "deletedFolder"):
            operations.append(DeleteFile(value.get("path", ""), folder=key == "deletedFolder"))
        else:
            raise HubHTTPError(400, f"commit operation {key!r} is not supported")
    if not isinstance(header, dict) or not str(header.get("summary", "")).strip():
        raise HubHTTPError(400, "the commit has no header with a summary")
    message = str(header["summary"]) + (f"\n\n{header['description']}" if header.get("description") else "")
    return registry.commit(repo_id, who, operations, message, parent=header.get("parentCommit"))


def _intact(registry: Registry, oid: str) -> bool:
    """Whether a blob is stored and still matches its sha256. A corrupted one is uploaded again, which replaces it:
    otherwise pushing the same file could never repair it."""
    try:
        registry.blobs.verified_path(oid)
    except BlobError:
        return False
    return True


def _tree_file(entry: FileEntry) -> dict:
    item = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.sha256}
    if entry.size >= LFS_THRESHOLD:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": LFS_POINTER_SIZE}
    return item


def _sibling(entry: FileEntry) -> dict:
    item = {"rfilename": entry.path, "size": entry.size, "blobId": entry.sha256}
    if entry.size >= LFS_THRESHOLD:
        item["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": LFS_POINTER_SIZE}
    return item


def _info(registry: Registry, repo: Repo, revision: Revision | None, endpoint: str | None) -> dict:
    files = registry.files(revision) if revision else []
    info = {
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.namespace,
        "sha": revision.commit if revision else None,
        "private": repo.private,
        "createdAt": iso_date(repo.created_at),
        "lastModified": iso_date(revision.created_at if revision else repo.created_at),
        "tags": ["peft", "lora"] if revision and revision.kind == "adapter" else [],
        "library_name": "peft" if revision and revision.kind == "adapter" else None,
        "siblings": [_sibling(e) for e in files],
        "usedStorage": sum(e.size for e in files),
        "loramux": {"kind": revision.kind if revision else None},
    }
    if revision is not None and revision.kind == "adapter" and any(e.path == CONFIG_FILE for e in files):
        info["config"] = _adapter_config(registry, files)
    return info


def _adapter_config(registry: Registry, files: list[FileEntry]) -> dict:
    entry = next(e for e in files if e.path == CONFIG_FILE)
    try:
        return {"adapter_config": json.loads(registry.blob_path(entry).read_text())}
    except (OSError, ValueError):
        return {}


__all__ = ["RepoView", "create_hub_app", "hub_router"]
