"""`strata`: the command line, thin over the HTTP API (through the SDK).

Branches are addressed as DB/BRANCH (DB alone means DB/main). Every command
takes --json and then prints one JSON object on stdout; errors go to stderr
(as {"error", "message"} with --json) with exit status 1.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.parse
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

import click

from engine import StrataError
from pageserver.errors import ServiceNotRunningError
from pageserver.service import daemon as service

if TYPE_CHECKING:
    from pageserver.clients.sdk import Strata

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


def _home(ctx: click.Context) -> str:
    return str(ctx.obj["home"])


def _client(ctx: click.Context, *, start: bool = False) -> Strata:
    """The SDK's client of the home's service; with `start`, the service is
    started first if none runs (as `strata up` would, with its defaults)."""
    if "client" not in ctx.obj:
        from pageserver.clients.sdk import Strata  # (not for up, down, restore)

        ctx.obj["client"] = Strata(_home(ctx), start=start)
    client: Strata = ctx.obj["client"]
    return client


def _split(address: str) -> tuple[str, str]:
    db, _, name = address.partition("/")
    if not db or "/" in name:
        raise click.BadParameter(f"{address!r}: use DB/BRANCH")
    return db, name or "main"


def _emit(as_json: bool, obj: Any, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(obj, default=str))
    else:
        click.echo(text if text is not None else json.dumps(obj, indent=2, default=str))


def command(group: click.Group, name: str, **kw: Any) -> Callable[[Callable[..., Any]], Any]:
    """A subcommand with --json whose StrataErrors become a clean message."""
    def wrap(fn: Callable[..., Any]) -> Any:
        @wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            as_json = kwargs.get("as_json", False)
            try:
                return fn(*args, **kwargs)
            except StrataError as e:
                if as_json:
                    click.echo(json.dumps({"error": getattr(e, "kind", type(e).__name__), "message": str(e)}),
                               err=True)
                else:
                    click.echo(f"strata: {e}", err=True)
                sys.exit(1)
        return group.command(name, **kw)(json_option(click.pass_context(run)))
    return wrap


@click.group()
@click.option("--home", envvar="STRATA_HOME", default=None,
              help="The service's home (default: $STRATA_HOME or ./.strata).")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Branchable, scale-to-zero PostgreSQL."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = os.path.abspath(home) if home else service.default_home()


# --- the service -------------------------------------------------------------------


LIMITS = (  # (option, what it limits): sizes take 512MB, 1GB, ...; 0 or none lifts a limit
    ("max-size", "Bytes of relation data per branch; a write past it fails with ENOSPC."),
    ("shared-buffers", "A compute's shared_buffers."),
    ("work-mem", "A compute's work_mem (the default a session starts with)."),
    ("memory", "A compute's memory, all its processes (a cgroup, where the system has one)."),
    ("creations-per-minute", "Databases, branches and passwords a token may make a minute."),
)


def limit_options(*, branch_connections: bool) -> Callable[[Callable[..., Any]], Any]:
    """The options that set limits (`pageserver.control.limits`): on `up`, the defaults."""
    def wrap(fn: Callable[..., Any]) -> Any:
        for name, text in reversed(LIMITS):
            fn = click.option(f"--{name}", name.replace("-", "_"), help=text)(fn)
        if branch_connections:
            fn = click.option("--branch-connections", type=click.IntRange(min=1),
                              help="Client connections per branch, at the proxy.")(fn)
        return fn
    return wrap


def _limits(values: dict[str, Any]) -> dict[str, Any]:
    names = {n.replace("-", "_") for n, _ in LIMITS} | {"branch_connections"}
    return {k: values.pop(k) for k in list(values) if k in names and values[k] is not None}


@command(cli, "up")
@click.option("--api-port", type=int, help="First start only: the API's port (default: a free one).")
@click.option("--proxy-port", type=int, help="First start only: the proxy's port (default: a free one).")
@click.option("--max-computes", type=int, help="Running computes at most (default: from memory).")
@click.option("--idle-timeout", type=float, help="Default idle timeout of branches, seconds (300).")
@click.option("--warm-pool", type=int, help="Spare computes kept running for new databases (0).")
@click.option("--max-connections", type=click.IntRange(min=1),
              help="Client connections the proxy takes at once, all branches (4096).")
@click.option("--branch-connections", type=click.IntRange(min=1),
              help="Client connections per branch, at the proxy (97).")
@click.option("--remote", help="The object store the data also lives in: s3://bucket/prefix (credentials and "
                                "endpoint from AWS_* variables) or file:///path. Kept in the home.")
@click.option("--cache-size", help="With --remote: local disk kept for layer files (512MB, 10GB); the least "
                                    "recently read ones beyond it are evicted (fetched again when read).")
@click.option("--durable", is_flag=True, help="With --remote: every commit waits for the object store "
                                            "(nothing acknowledged is lost with the machine; slower).")
@limit_options(branch_connections=False)
def up(ctx: click.Context, as_json: bool, api_port: int | None, proxy_port: int | None,
       max_computes: int | None, idle_timeout: float | None, warm_pool: int | None,
       max_connections: int | None, branch_connections: int | None, remote: str | None,
       cache_size: str | None, durable: bool, **limits: str | None) -> None:
    """Start the service in the background (if it is not running). The
    limit options set the defaults of databases that do not choose their own."""
    from pageserver.control.limits import parse_size

    try:
        cache = (parse_size(cache_size, "cache size") or None) if cache_size is not None else None  # (none: no bound)
        kept = os.path.exists(os.path.join(_home(ctx), "remote.json"))
        if cache is not None and remote is None and not kept:
            raise click.UsageError("--cache-size needs --remote: without one, every layer is kept here")
        if durable and remote is None and not kept:
            raise click.UsageError("--durable needs --remote: it makes commits wait for the object store")
        state = service.start(_home(ctx), api_port=api_port, proxy_port=proxy_port, max_computes=max_computes,
                              idle_timeout=idle_timeout, warm_pool=warm_pool, max_connections=max_connections,
                              branch_connections=branch_connections, limits=_limits(limits) or None,
                              remote=remote, cache_size=cache, durable=durable)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    out = {k: state[k] for k in ("api", "proxy", "token_file", "pid", "home")}
    _emit(as_json, out, f"Strata is up: API {out['api']}, proxy {out['proxy']} (pid {out['pid']}); "
                        f"token in {out['token_file']}")


@command(cli, "restore")
@click.option("--remote", required=True, help="The object store to restore from (s3://bucket/prefix, file:///path).")
@click.option("--home", "into", help="The new home (default: the global --home); it must be empty.")
@click.option("--force", is_flag=True, help="Take over at once: the node that held it is known to be gone "
                                            "(default: wait until its lease lapses).")
def restore(ctx: click.Context, as_json: bool, remote: str, into: str | None, force: bool) -> None:
    """Bring every database and branch back from an object store into a new
    home (names, passwords' verifiers, TTLs, history); then `strata up`."""
    from tqdm import tqdm

    from engine.objectstore import open_object_store
    from engine.remote import restore as restore_store
    from pageserver.compute.paths import private_dir, remote_url

    home = os.path.abspath(into) if into else _home(ctx)
    if os.path.isdir(home) and os.listdir(home):
        raise click.UsageError(f"{home} is not empty: restore into a new home")
    objects = open_object_store(remote)
    private_dir(home)
    with tqdm(total=0, unit="B", unit_scale=True, desc="log and layers", disable=as_json or None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = restore_store(objects, os.path.join(home, "store"), force=force, progress=progress)
    remote_url(home, remote)
    out = {"home": home, "remote": remote, **vars(report)}
    _emit(as_json, out, f"restored {report.timelines} timelines ({report.layers} layers, {report.layer_bytes} "
                        f"bytes; {report.log_bytes} bytes of log) into {home} in {report.seconds:.2f}s, "
                        f"generation {report.generation}; start it with: strata --home {home} up")


@command(cli, "down")
def down(ctx: click.Context, as_json: bool) -> None:
    """Stop the service and every compute it runs."""
    state = service.stop(_home(ctx))
    out = {"stopped": state is not None, "pid": state["pid"] if state else None}
    _emit(as_json, out, "Strata stopped." if state else "Strata was not running.")


@command(cli, "status")
@click.argument("address", required=False)
def status(ctx: click.Context, as_json: bool, address: str | None) -> None:
    """The service's status, or a database's or a branch's (DB[/BRANCH])."""
    c = _client(ctx)
    if address is None:
        state = service.read_state(ctx.obj["home"]) or {}
        processes = state.get("processes", {})
        lines = []
        for role, p in processes.items():
            fate = f", {p['restarts']} restarts, last {p['last_exit']}" if p.get("restarts") else ""
            lines.append(f"{role}: pid {p['pid']} as {p['user']}, {'running' if p['running'] else 'down'}{fate}")
        try:
            info = c.status()
        except ServiceNotRunningError as e:  # the page server is down (restarting, or gone)
            info = {"error": str(e)}
            text = f"page server not answering: {e}"
        else:
            text = (f"{info['databases']} databases, {info['branches']} branches, "
                    f"{len(info['running'])} running (at most {info['max_computes']})")
        limits = dict(state.get("limits", {}))  # the proxy's
        if limits:
            lines.append("proxy limits: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
        ours = info.get("limits")
        if isinstance(ours, dict):  # the databases' defaults, how memory is limited, what was refused
            limits.update(ours)
            lines.append("database limits (defaults): " + ", ".join(f"{k} {v}" for k, v in ours["defaults"].items()))
            lines.append(f"memory limits: {ours['memory_limits']}")
            lines.append("limit hits: " + ", ".join(f"{k} {v}" for k, v in ours["hits"].items()))
        rem = info.get("remote")
        if isinstance(rem, dict):
            lines.append(f"remote: {rem['url']}, generation {rem['generation']}"
                         f"{', FENCED: ' + str(rem['fenced']) if rem['fenced'] else ''}; {rem['chunks']} log "
                         f"chunks, {rem['layers']} layers, {rem['indexes']} indexes up; index {rem['index_lag_lsns']} "
                         "LSNs behind the head (the log has them)")
        _emit(as_json, {**info, "processes": processes, "limits": limits}, "\n".join([text, *lines]))
        return
    db, name = _split(address)
    info = c.branch(f"{db}/{name}").info
    size = f", {info['data_size']} bytes of relation data" if info.get("data_size") is not None else ""
    shown = ", ".join(f"{k} {_size(k, v)}" for k, v in info.get("limits", {}).items())
    _emit(as_json, info, f"{db}/{name}: {info['state']}, LSN {info['lsn']}, "
                         f"{info['connections']} connections{size}\nlimits: {shown}\n{info['uri']}")


# --- databases -----------------------------------------------------------------------

@cli.group()
def db() -> None:
    """Databases: create, list, delete."""


@command(db, "create")
@click.argument("name", required=False)
@click.option("--ttl", help="Delete after this long (seconds, or 90s, 15m, 1h, 2d).")
@click.option("--idle-timeout", help="Suspend its branches after this long without connections.")
@click.option("--expire-after-idle", help="Delete it when unused this long.")
@click.option("--durable", is_flag=True, help="Its commits return once the object store has them "
              "(the service needs --remote).")
@limit_options(branch_connections=True)
def db_create(ctx: click.Context, as_json: bool, name: str | None, ttl: str | None,
              idle_timeout: str | None, expire_after_idle: str | None, durable: bool, **limits: Any) -> None:
    """Create a database (a branch of the template: no initdb). The limit
    options override the service's defaults for it. With nothing running,
    the home's service is started first (`strata up`'s defaults): one line
    from nothing to a URI."""
    d = _client(ctx, start=True).create_database(name, ttl=ttl, idle_timeout=idle_timeout,
                                                 expire_after_idle=expire_after_idle, durable=durable,
                                                 **_limits(limits))
    _emit(as_json, {"name": d.database, "branch": "main", "uri": d.uri, "token": d.token,
                    "expires_at": d.info.get("expires_at"), "limits": d.info.get("limits"),
                    "durable": d.info.get("durable")}, d.uri)
    if d.info.get("expires_at") and not as_json:
        click.echo(f"expires {d.info['expires_at']}", err=True)  # (stdout stays the URI alone)


@command(db, "claim")
@click.argument("name")
def db_claim(ctx: click.Context, as_json: bool, name: str) -> None:
    """Keep a temporary database: its TTL goes, its passwords and token are
    replaced (their connections end). Prints its new URI."""
    info = _client(ctx).call("POST", f"/databases/{name}/claim")
    _emit(as_json, {"name": name, "uri": info["uri"], "token": info.get("token"),
                    "expires_at": info.get("expires_at")}, info["uri"])


@command(db, "durable")
@click.argument("name")
@click.argument("mode", required=False, type=click.Choice(["on", "off"]))
def db_durable(ctx: click.Context, as_json: bool, name: str, mode: str | None) -> None:
    """Show a database's durable mode, or turn it on or off: on, its commits
    return once the object store has them (the service needs --remote)."""
    d = _client(ctx).database(name)
    now = bool(d.info["durable"]) if mode is None else d.set_durable(mode == "on")
    _emit(as_json, {"name": name, "durable": now}, f"{name}: durable {'on' if now else 'off'}")


@command(db, "limit")
@click.argument("name")
@limit_options(branch_connections=True)
def db_limit(ctx: click.Context, as_json: bool, name: str, **limits: Any) -> None:
    """Show a database's limits, or change them (a raised cap reaches its running computes at once)."""
    client = _client(ctx)
    given = _limits(limits)
    if given:
        now = client.call("PATCH", f"/databases/{name}", given)["limits"]
    else:
        now = client.database(name).info["limits"]
    _emit(as_json, {"name": name, "limits": now}, "\n".join(f"{k}: {_size(k, v)}" for k, v in now.items()))


def _size(name: str, v: int) -> str:
    if v == 0:
        return "none"
    if name in ("max_size", "shared_buffers", "work_mem", "memory"):
        for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
            if v >= size and v % size == 0:
                return f"{v // size} {unit}"
    return str(v)


@command(db, "list")
def db_list(ctx: click.Context, as_json: bool) -> None:
    """List databases with their last use."""
    dbs = [d.info for d in _client(ctx).databases()]
    lines = [f"{d['name']:24} {len(d['branches']):3} branches  last used {d['last_used']}" for d in dbs]
    _emit(as_json, {"databases": dbs}, "\n".join(lines) or "(no databases)")


@command(db, "delete")
@click.argument("name")
def db_delete(ctx: click.Context, as_json: bool, name: str) -> None:
    """Delete a database and all its branches."""
    _client(ctx).call("DELETE", f"/databases/{name}")
    _emit(as_json, {"deleted": name}, f"deleted {name}")


# --- branches --------------------------------------------------------------------------

@cli.group()
def branch() -> None:
    """Branches: create, list, delete, reset, restore, detach."""


@command(branch, "create")
@click.argument("address")
@click.option("--from", "parent", help="DB/PARENT to branch from (default: DB/main).")
@click.option("--lsn", type=int, help="Branch at this LSN of the parent.")
@click.option("--time", "at_time", help="Branch as of this time (ISO 8601).")
@click.option("--ttl", help="Delete after this long.")
@click.option("--idle-timeout", help="Suspend after this long without connections.")
@click.option("--expire-after-idle", help="Delete when unused this long.")
@click.option("--protected", is_flag=True, help="Refuse deletion and reset.")
def branch_create(ctx: click.Context, as_json: bool, address: str, parent: str | None, lsn: int | None,
                  at_time: str | None, ttl: str | None, idle_timeout: str | None,
                  expire_after_idle: str | None, protected: bool) -> None:
    """Create branch DB/NAME (O(1), whatever the size)."""
    dbname, name = _split(address)
    src = "main"
    if parent:
        pdb, src = _split(parent) if "/" in parent else (dbname, parent)
        if pdb != dbname:
            raise click.BadParameter(f"--from {parent}: a branch of another database")
    info = _client(ctx).call("POST", f"/databases/{dbname}/branches", {
        "name": name, "parent": src, "lsn": lsn, "time": at_time, "ttl": ttl, "idle_timeout": idle_timeout,
        "expire_after_idle": expire_after_idle, "protected": protected})
    _emit(as_json, {"name": f"{dbname}/{name}", "uri": info["uri"], "lsn": info["lsn"]}, info["uri"])


@command(branch, "list")
@click.argument("database")
def branch_list(ctx: click.Context, as_json: bool, database: str) -> None:
    """List a database's branches with state, size and last use."""
    brs = _client(ctx).call("GET", f"/databases/{database}/branches")
    lines = [f"{b['name']:24} {b['state']:9} {b['logical_size'] or 0:>12} B  "
             f"alone {b['exclusive_size'] or 0:>10} B  last used {b['last_used']}" for b in brs]
    _emit(as_json, {"branches": brs}, "\n".join(lines))


def _branch_action(name: str, verb: str, method: str, doc: str) -> None:
    @command(branch, name)
    @click.argument("address")
    def action(ctx: click.Context, as_json: bool, address: str) -> None:
        dbname, br = _split(address)
        path = f"/databases/{dbname}/branches/{br}" + (f"/{verb}" if verb else "")
        info = _client(ctx).call(method, path)
        _emit(as_json, info or {"deleted": f"{dbname}/{br}"}, f"{dbname}/{br}: {name} done")
    action.__doc__ = doc


_branch_action("delete", "", "DELETE", "Delete a branch (not main: delete the database).")
_branch_action("reset", "reset", "POST", "Reset a branch to its parent's head.")
_branch_action("detach", "detach", "POST", "Give a branch its own copy of what it shares with its parent.")


@command(branch, "restore")
@click.argument("address")
@click.option("--lsn", type=int)
@click.option("--time", "at_time")
def branch_restore(ctx: click.Context, as_json: bool, address: str, lsn: int | None, at_time: str | None) -> None:
    """Take a branch back to its state at --lsn or --time (a backup branch keeps the rest)."""
    dbname, br = _split(address)
    info = _client(ctx).call("POST", f"/databases/{dbname}/branches/{br}/restore", {"lsn": lsn, "time": at_time})
    _emit(as_json, info, f"{dbname}/{br} restored; previous state kept as {dbname}/{info['backup']['name']}")


# --- one branch ---------------------------------------------------------------------------

@command(cli, "suspend")
@click.argument("address")
def suspend(ctx: click.Context, as_json: bool, address: str) -> None:
    """Stop a branch's compute now (it wakes on the next connection)."""
    dbname, br = _split(address)
    info = _client(ctx).call("POST", f"/databases/{dbname}/branches/{br}/suspend")
    _emit(as_json, {"name": f"{dbname}/{br}", "state": info["state"]}, f"{dbname}/{br}: {info['state']}")


@command(cli, "uri")
@click.argument("address")
@click.option("--ttl", default=None, help="the password works this long (90s, 15m, 1h; default: as the branch)")
def uri(ctx: click.Context, as_json: bool, address: str, ttl: str | None) -> None:
    """A branch's connection URI, with a new password (shown only here)."""
    dbname, br = _split(address)
    b = _client(ctx).branch(f"{dbname}/{br}")
    u = b.new_uri(ttl=ttl)
    _emit(as_json, {"name": f"{dbname}/{br}", "uri": u}, u)


@command(cli, "diff")
@click.argument("a")
@click.argument("b")
@click.option("--stat", is_flag=True, help="Relations and pages only, from storage (starts no compute).")
@click.option("--rows", is_flag=True, help="Rows added, removed and modified per table (the default).")
@click.option("--schema", is_flag=True, help="A unified diff of pg_dump --schema-only (if a catalog changed).")
@click.option("--max-pages", type=click.IntRange(min=0), default=None,
              help="Skip the rows of a table whose diff would read more blocks.")
def diff(ctx: click.Context, as_json: bool, a: str, b: str, stat: bool, rows: bool, schema: bool,
         max_pages: int | None) -> None:
    """What changed from A to B (each DB/BRANCH, DB/BRANCH@LSN or DB/BRANCH@TIME)."""
    if stat and (rows or schema):
        raise click.UsageError("--stat reads storage only: give it alone")
    want_rows = rows or not (stat or schema)
    out = _client(ctx).call("POST", "/diff", {"a": a, "b": b, "rows": want_rows, "schema": schema,
                                              "max_pages": max_pages})
    _emit(as_json, out, _diff_text(out))


def _diff_text(out: dict[str, Any]) -> str:
    pages = out["pages"]
    base = pages["base"]
    lines = [f"{out['a']['address']} (LSN {out['a']['lsn']}) -> {out['b']['address']} (LSN {out['b']['lsn']}); "
             + (f"common point LSN {base['lsn']}" if base else "no common history")]
    for r in pages["relations"]:
        where = f"{r['db']}/{r['relfilenode']}" + (" (catalog)" if r["catalog"] else "")
        forks = "".join(f", {k} {v}" for k, v in sorted(r["forks"].items()))
        lines.append(f"  {where:<24} {r['status']:<9} {len(r['blocks'])} blocks differ "
                     f"(a wrote {r['a_wrote']}, b wrote {r['b_wrote']}; {r['masked']} hint-only{forks})")
    if not pages["relations"]:
        lines.append("  no relation differs")
    for t in out.get("rows", []):
        head = f"  {t['database']}: {t['table']} ({t['status']}, {t['pages_read']} pages read)"
        if "skipped" in t:
            lines.append(f"{head}: skipped, {t['skipped']}")
            continue
        c = t["counts"]
        lines.append(f"{head}: +{c['added']} -{c['removed']} ~{c['modified']}")
        lines += [f"    + {r}" for r in t["added"]] + [f"    - {r}" for r in t["removed"]]
        lines += [f"    ~ {m['key']}: " + ", ".join(f"{k} {v['from_']!r} -> {v['to_']!r}"
                                                  for k, v in m["changes"].items()) for m in t["modified"]]
    if "schema" in out:
        lines.append(out["schema"]["diff"] or f"  schema: unchanged ({out['schema'].get('skipped', 'same dump')})")
    lines += [f"  note: {n}" for n in out.get("notes", [])]
    lines.append(f"  ({out['seconds'] * 1e3:.0f} ms; pages in {pages['seconds'] * 1e3:.1f} ms)")
    return "\n".join(lines)


@command(cli, "merge")
@click.argument("source")
@click.argument("target")
@click.option("--dry-run", is_flag=True, help="Show the patch and its conflicts; change nothing.")
@click.option("--max-pages", type=click.IntRange(min=0), default=None)
def merge(ctx: click.Context, as_json: bool, source: str, target: str, dry_run: bool,
          max_pages: int | None) -> None:
    """Merge SOURCE into TARGET (DB/BRANCH each): fast-forward, or a row patch."""
    out = _client(ctx).call("POST", "/merge", {"source": source, "target": target, "dry_run": dry_run,
                                               "max_pages": max_pages})
    if out["mode"] == "fast-forward":
        text = (f"{target} would fast-forward to {source}" if dry_run else
                f"{target} fast-forwarded to {source}; its previous state is {out['backup']}")
    else:
        text = (out.get("patch", "") + "\n" if dry_run else "") + (
            f"{out['statements']} statements, {len(out['conflicts'])} conflicts"
            + ("" if dry_run else f": {source} merged into {target}"))
        text += "".join(f"\n  conflict: {c['table']} {c['statement']} {c['row']}" for c in out["conflicts"])
    _emit(as_json, out, text)


@command(cli, "lsn")
@click.argument("address")
def lsn(ctx: click.Context, as_json: bool, address: str) -> None:
    """A branch's current LSN (to branch at it later)."""
    dbname, br = _split(address)
    value = _client(ctx).branch(f"{dbname}/{br}").lsn()
    _emit(as_json, {"name": f"{dbname}/{br}", "lsn": value}, str(value))


@command(cli, "bench")
@click.argument("base")
@click.option("--load", help="Shell command that loads the base if it does not exist ($DATABASE_URL).")
@click.option("--run", "workload", required=True, help="Shell command run on each fresh branch ($DATABASE_URL).")
@click.option("--runs", type=int, default=3, show_default=True, help="How many runs, each on its own branch.")
@click.option("--no-checksum", is_flag=True, help="Skip checking that every run starts from identical data.")
@click.option("--keep", is_flag=True, help="Keep the run branches (they expire after 1h).")
def bench(ctx: click.Context, as_json: bool, base: str, load: str | None, workload: str, runs: int,
          no_checksum: bool, keep: bool) -> None:
    """Load BASE once, then run a workload N times, each on a fresh branch of it."""
    from pageserver.clients.loadonce import load_once

    report = load_once(_client(ctx), base=base, load=load, workload=workload, runs=runs,
                       checksum=not no_checksum, keep=keep, home=_home(ctx))
    lines = [f"base {base}: " + (f"loaded in {report.load_seconds:.1f} s" if report.loaded_now
                                 else "loaded earlier")]
    for r in report.runs:
        figs = ", ".join(f"{k} {v:g}" for k, v in r.figures.items())
        lines.append(f"run {r.index}: {r.seconds:.1f} s{', ' + figs if figs else ''}"
                     f"{'' if r.returncode == 0 else f' (exit {r.returncode})'}")
    lines.append(f"load time saved: {report.load_seconds_saved:.1f} s; identical start: {report.identical_start}")
    _emit(as_json, report.to_dict(), "\n".join(lines))
    if any(r.returncode != 0 for r in report.runs):
        sys.exit(1)


@command(cli, "check")
def check(ctx: click.Context, as_json: bool) -> None:
    """Verify the store: checksums, manifest against files, every timeline
    readable. Through the service if it runs, else on the store directly,
    read-only (recovery's repairs are made in memory and dropped: nothing
    on disk changes). Exit status 1 on any problem, 2 if there is no store."""
    home = _home(ctx)
    if service.read_state(home) is not None:
        report = _client(ctx).call("POST", "/check")
    else:
        from engine import Store, StoreLockedError
        from engine.fs import OverlayFileSystem
        from pageserver.control.objects import check_report

        path = os.path.join(home, "store")
        if not os.path.isfile(os.path.join(path, "manifest")):
            click.echo(f"strata: no store at {path} (is --home right?)", err=True)
            sys.exit(2)
        try:
            with Store.open(path, fs=OverlayFileSystem(), background=False) as store:
                report = check_report(store.check())
        except StoreLockedError as e:
            click.echo(f"strata: {e}: a page server has it open (the service starting or stopping?)", err=True)
            sys.exit(2)
    lines = [f"{report['timelines']} timelines, {report['layers']} layer files, {report['values']} values, "
             f"{report['reads']} reads checked: " + ("no problem" if report["ok"] else
                                                     f"{len(report['problems'])} problems")]
    lines += [f"  {p}" for p in report["problems"]]
    _emit(as_json, report, "\n".join(lines))
    if not report["ok"]:
        sys.exit(1)


@cli.command("psql", context_settings={"ignore_unknown_options": True})
@click.argument("address")
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def psql(ctx: click.Context, address: str, psql_args: tuple[str, ...]) -> None:
    """Run psql on a branch (extra arguments go to psql)."""
    dbname, br = _split(address)
    try:
        target = urllib.parse.urlsplit(_client(ctx).branch(f"{dbname}/{br}").new_uri(ttl="1d"))
    except StrataError as e:
        click.echo(f"strata: {e}", err=True)
        sys.exit(1)
    exe = shutil.which("psql") or "/usr/bin/psql"
    # the password in the environment, not on a command line that every local user can read
    env = {**os.environ, "PGPASSWORD": urllib.parse.unquote(target.password or "")}
    bare = target._replace(netloc=f"{target.username}@{target.hostname}:{target.port}").geturl()
    os.execve(exe, [exe, bare, *psql_args], env)


# --- agents -----------------------------------------------------------------------------

@cli.command("mcp")
@click.option("--database", help="Databases the agent may use (a pattern: shop*, default all).")
@click.option("--branch", help="Branches it may use (a pattern, default all).")
@click.option("--access", type=click.Choice(["read-only", "read-write", "admin"]),
              help="read-only (enforced by PostgreSQL), read-write (default), admin (may delete databases).")
@click.option("--max-ttl", help="Longest TTL it may give (90s, 15m, 1h); then nothing it makes is persistent.")
@click.option("--max-databases", type=click.IntRange(min=0), help="Databases it may create.")
@click.option("--max-branches", type=click.IntRange(min=0), help="Branches it may create.")
@click.option("--http", "http_port", type=int, default=None,
              help="Serve streamable HTTP on this loopback port (default: stdio).")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --http: the address to listen on.")
@click.pass_context
def mcp(ctx: click.Context, http_port: int | None, host: str, **settings: Any) -> None:
    """Serve the agents' MCP interface (stdio, or HTTP with a bearer token
    in $STRATA_MCP_TOKEN or a new one shown once on stderr)."""
    from pageserver.clients import mcp as agents

    client = _client(ctx, start=True)
    try:
        grant = agents.grant_for(client, {k: v for k, v in settings.items() if v is not None})
    except StrataError as e:
        raise click.UsageError(str(e)) from None
    if http_port is None:
        server, tools = agents.build_server(client, grant)
        try:
            server.run("stdio")
        finally:
            tools.close()
        return
    token = os.environ.get("STRATA_MCP_TOKEN") or agents.new_token()
    if not os.environ.get("STRATA_MCP_TOKEN"):
        click.echo(f"MCP at http://{host}:{http_port}/mcp, bearer token {token}", err=True)
    agents.serve_http(client, grant, host=host, port=http_port, token=token)


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
