"""The HTTP API (JSON, under /v1), a thin layer over the control plane
(`ControlPlane` in this process, or `RemoteControl` to the page server's).

Every route needs `Authorization: Bearer <token>`: the operator token (made
at the service's first start, in `<home>/token`, mode 0600) may do
anything; a database's scoped token (returned once, when the database is
created) may read that database and manage its branches, and gets 403
everywhere else. The OpenAPI document is at /v1/openapi.json; Prometheus
metrics at /metrics (operator token). Errors come back as
`{"error": <type>, "message": <text>}` with the status their type maps to
(in `status_of`, the one place that does it).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from engine import (
    AlreadyExistsError,
    HasChildrenError,
    InvalidArgumentError,
    LsnOutOfRangeError,
    NotFoundError,
    StrataError,
)
from pageserver.control.objects import MAIN, OPERATOR
from pageserver.control.rpc import RemoteControl
from pageserver.errors import BranchBusyError, ControlPlaneError, RateLimitedError

if TYPE_CHECKING:
    from pageserver.control.plane import ControlPlane

Duration = float | str | None
Size = int | str | None


class DatabaseLimits(BaseModel):
    """What the database may take (absent: the service's default; sizes in
    bytes or as "512MB"; 0 or "none": no limit, where one may be lifted)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt limit must not pass for no limit

    max_size: Size = Field(None, description="bytes of relation data per branch (ENOSPC past it)")
    branch_connections: int | None = Field(None, description="client connections per branch, at the proxy")
    shared_buffers: Size = None
    work_mem: Size = None
    memory: Size = Field(None, description="a compute's memory, all its processes (a cgroup)")
    creations_per_minute: int | str | None = Field(None, description="for its token: databases, branches "
                                                   "and passwords made a minute")

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def limits(self) -> dict[str, Any]:
        """The limits given (not a subclass's other fields)."""
        return {k: v for k, v in self.given().items() if k in DatabaseLimits.model_fields}


class DatabaseCreate(DatabaseLimits):
    name: str | None = Field(None, description="1-63 of [a-z0-9_-]; generated when absent")
    ttl: Duration = Field(None, description="delete after this long: seconds, or 90s, 15m, 1h, 2d")
    idle_timeout: Duration = Field(None, description="suspend branches idle this long (default 300 s)")
    expire_after_idle: Duration = Field(None, description="delete when unused this long")
    durable: StrictBool = Field(False, description="with a remote: commits return once the object store has them")


class DatabaseUpdate(DatabaseLimits):
    durable: StrictBool | None = Field(None, description="turn durable mode on or off (absent: as it is)")


class BranchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # (limits are its database's: a branch has none of its own)

    name: str
    parent: str = MAIN
    lsn: int | None = Field(None, description="branch at this LSN of the parent (default: its head)")
    time: str | None = Field(None, description="or as of this time (ISO 8601)")
    ttl: Duration = None
    idle_timeout: Duration = None
    expire_after_idle: Duration = None
    protected: bool = False


class CredentialCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: Duration = Field(None, description="the password works this long (default: as long as the branch)")
    readonly: StrictBool = Field(False, description="it opens the branch only as a role PostgreSQL keeps "
                                 "from writing (strata_readonly)")


class BranchUpdate(BaseModel):
    protected: bool | None = None
    ttl: Duration = None
    idle_timeout: Duration = None
    expire_after_idle: Duration = None


class Restore(BaseModel):
    lsn: int | None = None
    time: str | None = None


class DiffRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: str = Field(description="DB/BRANCH, DB/BRANCH@LSN or DB/BRANCH@TIME")
    b: str = Field(description="the same, the other side")
    rows: bool = Field(True, description="row diff of the tables whose pages changed")
    schema_: bool = Field(False, alias="schema", description="pg_dump --schema-only diff (if a catalog changed)")
    max_pages: int | None = Field(None, ge=0, description="read no table whose diff needs more blocks")


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="DB/BRANCH whose changes are merged")
    target: str = Field(description="DB/BRANCH that receives them (same database)")
    dry_run: bool = Field(False, description="show the patch and its conflicts, change nothing")
    max_pages: int | None = Field(None, ge=0)


def status_of(e: StrataError) -> int:
    if isinstance(e, ControlPlaneError):
        return e.status
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, AlreadyExistsError | HasChildrenError | BranchBusyError):
        return 409
    if isinstance(e, InvalidArgumentError | LsnOutOfRangeError):
        return 400
    return 500


def make_app(control: ControlPlane | RemoteControl, token: str | Callable[[], str], *, on_shutdown: Any = None,
             extra_metrics: Callable[[], str] | None = None) -> FastAPI:
    """The API over `control`; `token` is the operator's (or a callable
    that returns it: the front end makes the app before it has it)."""
    operator_token = token if callable(token) else (lambda: token)
    app = FastAPI(title="Strata", version="1", openapi_url="/v1/openapi.json", docs_url=None,
                  redoc_url=None, description="Branchable, scale-to-zero PostgreSQL databases.")
    bearer = HTTPBearer(auto_error=False)

    def principal(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str | None:  # noqa: B008
        """None for the operator, else the database the token is scoped to."""
        if cred is not None:
            known = operator_token()
            if known and secrets.compare_digest(cred.credentials.encode(), known.encode()):
                return None
            scoped = control.database_for_token(cred.credentials)
            if scoped is not None:
                return scoped
        raise HTTPException(401, "a valid bearer token is required (the operator's is in <home>/token)",
                            headers={"WWW-Authenticate": "Bearer"})

    def operator(who: str | None = Depends(principal)) -> None:  # noqa: B008
        if who is not None:
            raise HTTPException(403, f"this token is scoped to database {who!r}")

    def database_access(db: str, who: str | None = Depends(principal)) -> None:  # noqa: B008
        if who is not None and who != db:
            raise HTTPException(403, f"this token is scoped to database {who!r}, not {db!r}")

    @app.exception_handler(StrataError)
    async def strata_error(request: Request, e: StrataError) -> JSONResponse:
        headers = None
        if isinstance(e, RateLimitedError):
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
        return JSONResponse({"error": type(e).__name__, "message": str(e)}, status_code=status_of(e),
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        what = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
                         for err in e.errors())
        return JSONResponse({"error": "BadRequestError", "message": f"invalid request: {what}"},
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": "HTTPError", "message": str(e.detail)}, status_code=e.status_code,
                            headers=e.headers)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(operator)])
    dbr = APIRouter(prefix="/v1", dependencies=[Depends(database_access)])

    @app.get("/metrics", dependencies=[Depends(operator)])
    def metrics() -> Response:
        text = control.metrics_text() + (extra_metrics() if extra_metrics else "")
        return Response(text, media_type="text/plain; version=0.0.4")

    @v1.get("/status")
    def status() -> dict[str, Any]:
        return control.status()

    @v1.post("/databases", status_code=201)
    def create_database(req: DatabaseCreate) -> dict[str, Any]:
        """Returns the database with its URI and its scoped `token` (only here)."""
        return control.create_database(req.name, ttl=req.ttl, idle_timeout=req.idle_timeout,
                                       expire_after_idle=req.expire_after_idle, limits=req.limits(),
                                       caller=OPERATOR, durable=req.durable).to_dict()

    @dbr.post("/databases/{db}/claim")
    def claim_database(db: str, who: str | None = Depends(principal)) -> dict[str, Any]:  # noqa: B008
        """Keep a temporary database: no TTL, new passwords and token (shown only here)."""
        return control.claim_database(db, caller=who or OPERATOR).to_dict()

    @v1.get("/databases")
    def list_databases() -> list[dict[str, Any]]:
        return [d.to_dict() for d in control.databases()]

    @dbr.get("/databases/{db}")
    def get_database(db: str) -> dict[str, Any]:
        return control.database(db).to_dict()

    @v1.patch("/databases/{db}")
    def update_database(db: str, req: DatabaseUpdate) -> dict[str, Any]:
        """Change the limits it chose, or its durable mode (the operator's:
        a database's own token cannot lift them)."""
        return control.update_database(db, limits=req.limits(), durable=req.durable).to_dict()

    @v1.delete("/databases/{db}", status_code=204)
    def delete_database(db: str) -> None:
        control.delete_database(db)

    @dbr.post("/databases/{db}/branches", status_code=201)
    def create_branch(db: str, req: BranchCreate, who: str | None = Depends(principal)) -> dict[str, Any]:  # noqa: B008
        return control.create_branch(
            db, req.name, parent=req.parent, lsn=req.lsn, time=req.time, ttl=req.ttl,
            idle_timeout=req.idle_timeout, expire_after_idle=req.expire_after_idle, protected=req.protected,
            caller=who or OPERATOR,
        ).to_dict()

    @dbr.get("/databases/{db}/branches")
    def list_branches(db: str) -> list[dict[str, Any]]:
        return [b.to_dict() for b in control.branches(db)]

    @dbr.get("/databases/{db}/branches/{name}")
    def get_branch(db: str, name: str) -> dict[str, Any]:
        return control.branch(db, name).to_dict()

    @dbr.patch("/databases/{db}/branches/{name}")
    def update_branch(db: str, name: str, req: BranchUpdate) -> dict[str, Any]:
        return control.update_branch(db, name, protected=req.protected, ttl=req.ttl,
                                     idle_timeout=req.idle_timeout,
                                     expire_after_idle=req.expire_after_idle).to_dict()

    @dbr.delete("/databases/{db}/branches/{name}", status_code=204)
    def delete_branch(db: str, name: str) -> None:
        control.delete_branch(db, name)

    @dbr.post("/databases/{db}/branches/{name}/reset")
    def reset_branch(db: str, name: str) -> dict[str, Any]:
        return control.reset_branch(db, name).to_dict()

    @dbr.post("/databases/{db}/branches/{name}/restore")
    def restore_branch(db: str, name: str, req: Restore,
                       who: str | None = Depends(principal)) -> dict[str, Any]:  # noqa: B008
        branch, backup = control.restore_branch(db, name, lsn=req.lsn, time=req.time, caller=who or OPERATOR)
        return {**branch.to_dict(), "backup": backup.to_dict()}

    @dbr.post("/databases/{db}/branches/{name}/detach")
    def detach_branch(db: str, name: str) -> dict[str, Any]:
        return control.detach_branch(db, name).to_dict()

    @dbr.post("/databases/{db}/branches/{name}/suspend")
    def suspend(db: str, name: str) -> dict[str, Any]:
        return control.suspend(db, name).to_dict()

    @dbr.post("/databases/{db}/branches/{name}/start")
    def start(db: str, name: str) -> dict[str, Any]:
        return control.start(db, name).to_dict()

    @dbr.post("/databases/{db}/branches/{name}/credentials", status_code=201)
    def credentials(db: str, name: str, req: CredentialCreate,
                    who: str | None = Depends(principal)) -> dict[str, Any]:  # noqa: B008
        """A new password of the branch's, in its URI (shown only here: the
        catalog keeps its SCRAM verifier)."""
        return {"uri": control.uri(f"{db}/{name}", ttl=req.ttl, caller=who or OPERATOR, readonly=req.readonly)}

    @dbr.get("/databases/{db}/branches/{name}/lsn")
    def lsn(db: str, name: str) -> dict[str, Any]:
        return {"lsn": control.lsn(db, name)}

    @app.post("/v1/diff")
    def diff(req: DiffRequest, who: str | None = Depends(principal)) -> dict[str, Any]:  # noqa: B008
        """What changed between two points: relations and pages, rows, schema
        (a database's token: two points of its own)."""
        if who is not None and any(side.split("/")[0] != who for side in (req.a, req.b)):
            raise HTTPException(403, f"this token is scoped to database {who!r}")
        return control.diff(req.a, req.b, rows=req.rows, schema=req.schema_, max_pages=req.max_pages)

    @v1.post("/merge")
    def merge(req: MergeRequest, who: str | None = Depends(principal)) -> dict[str, Any]:  # noqa: B008
        """Merge a branch into another: fast-forward, or a row patch refused whole on a conflict."""
        return control.merge(req.source, req.target, dry_run=req.dry_run, max_pages=req.max_pages,
                             caller=who or OPERATOR)

    @v1.post("/check")
    def check() -> dict[str, Any]:
        """Verify the store end to end (every checksum, manifest against
        files, every timeline readable at its retained LSNs). Slow."""
        return control.check()

    @v1.post("/shutdown", status_code=202)
    def shutdown() -> dict[str, Any]:
        if on_shutdown is not None:
            on_shutdown()
        return {"stopping": True}

    app.include_router(v1)
    app.include_router(dbr)
    return app
