"""``blaze keys``: make, list, change and revoke API keys in Redis directly, so a fresh
deployment's first admin key needs no API running."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from datetime import datetime, timezone
from typing import Any

import redis

from blaze_jobs import api_keys, audit
from blaze_jobs.api_keys import ApiKey
from blaze_jobs.settings import Settings, get_settings


def _operator(settings: Settings) -> ApiKey:
    """Who ``blaze keys`` acts as in the audit trail: ``cli``, named for the OS user."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        user = "cli"
    return audit.cli_operator(settings, user)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_key(key: ApiKey) -> None:
    fields: dict[str, object] = {"id": key.id, "tenant": key.tenant, "name": key.name, "admin": "yes" if key.admin else "no"}
    fields |= {"rate": key.rate or "unlimited", "max_jobs": key.max_jobs or "no quota", "max_priority": key.max_priority}
    for name, value in {**fields, "created_at": _when(key.created_at)}.items():
        print(f"{name:<13} {'any' if value is None else value}")


def _limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The limits ``blaze keys update`` was given; ``default`` puts one back to the deployment's."""
    changes: dict[str, Any] = {}
    for name in api_keys.LIMITS:
        value = getattr(args, name)
        if value is None:
            continue
        if value == "default" or name == "rate":
            changes[name] = None if value == "default" else value
            continue
        try:
            changes[name] = int(value)
        except ValueError:
            raise ValueError(f"{name}: must be an integer or default (got {value!r})") from None
    if not changes:
        raise ValueError("nothing to change: give --rate, --max-jobs or --max-priority")
    return changes


def _keys_create(client: redis.Redis, settings: Settings, args: argparse.Namespace) -> tuple[ApiKey, str]:
    limits = {"rate": args.rate, "max_jobs": args.max_jobs, "max_priority": args.max_priority}
    secret, key = api_keys.create_key(client, settings, tenant=args.tenant, name=args.name, admin=args.admin, **limits)
    _print_key(key)
    print("The key, shown this once (Redis keeps only its hash):")
    print(secret)
    return key, key.id


def _keys_list(client: redis.Redis, settings: Settings, args: argparse.Namespace) -> None:
    keys = api_keys.list_keys(client, settings, args.tenant)
    print(f"{'ID':<16} {'TENANT':<20} {'NAME':<20} {'ADMIN':<5} {'RATE':<14} {'MAX_JOBS':>8} {'MAX_PRIO':>8}  CREATED")
    for key in keys:
        priority = "-" if key.max_priority is None else key.max_priority
        limits = f"{key.rate or '-':<14} {key.max_jobs or '-':>8} {priority:>8}"
        print(f"{key.id:<16} {key.tenant:<20} {key.name:<20} {'yes' if key.admin else 'no':<5} {limits}  {_when(key.created_at)}")


def _keys_revoke(client: redis.Redis, settings: Settings, args: argparse.Namespace) -> tuple[ApiKey, str]:
    key = api_keys.revoke_key(client, settings, args.key_or_id)
    if key is None:
        given = args.key_or_id if api_keys.KEY_ID.fullmatch(args.key_or_id) else "(given by its secret)"
        raise ValueError(f"no API key {given}")
    print(
        f"revoked {key.id} (tenant {key.tenant}, name {key.name}); every API process drops it within {settings.key_cache_s:g} s"
    )
    return key, key.id


def _keys_update(client: redis.Redis, settings: Settings, args: argparse.Namespace) -> tuple[ApiKey, str]:
    changes = _limit_changes(args)
    key = api_keys.update_key(client, settings, args.key_id, changes)
    if key is None:
        raise ValueError(f"no API key {args.key_id}")
    _print_key(key)
    return key, audit.change_target(key.id, changes)


_KEY_CHANGES = {
    "create": (_keys_create, "key.create"),
    "revoke": (_keys_revoke, "key.revoke"),
    "update": (_keys_update, "key.update"),
}


def cmd_keys(args: argparse.Namespace) -> int:
    """``blaze keys``: make, list, change and revoke API keys in Redis directly (BLAZE_REDIS_URL,
    BLAZE_REDIS_PREFIX), so a fresh deployment's first admin key needs no API running. Each
    change goes to the audit trail as done by ``cli`` from this host."""
    settings = get_settings()
    try:
        with redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10) as client:
            if args.keys_command == "list":
                _keys_list(client, settings, args)
                return 0
            # Each change, then its audit entry: what changed, by `cli` from this host.
            run, action = _KEY_CHANGES[args.keys_command]
            key, target = run(client, settings, args)
            host = socket.gethostname()
            audit.record(client, settings, key=_operator(settings), action=action, target=target, tenant=key.tenant, address=host)
    except ValueError as error:
        print(f"blaze keys: {error}", file=sys.stderr)
        return 2
    except redis.RedisError as error:
        print(f"blaze keys: cannot use Redis at {settings.redis_url}: {error}", file=sys.stderr)
        return 2
    return 0


def add_parser(commands: Any) -> None:
    """``blaze keys`` and its actions, on the ``blaze`` parser's subcommands."""
    keys = commands.add_parser("keys", help="make, list, change and revoke API keys (in Redis: BLAZE_REDIS_URL)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys.set_defaults(func=cmd_keys)
    create = keys_commands.add_parser("create", help="make a key; prints it once, alone on the last line")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--name", required=True, help="what the key is for (ci, alice)")
    create.add_argument("--admin", action="store_true", help="may manage keys of every tenant and read the audit trail")
    create.add_argument("--rate", help="requests allowed, e.g. 600/minute (default BLAZE_DEFAULT_RATE)")
    create.add_argument("--max-jobs", type=int, help="the tenant's jobs queued plus running (default BLAZE_DEFAULT_MAX_JOBS)")
    create.add_argument("--max-priority", type=int, help="the highest job priority the key may ask for (default: any)")
    listing = keys_commands.add_parser("list", help="list keys, without their secrets")
    listing.add_argument("--tenant", help="only this tenant's keys")
    revoke = keys_commands.add_parser("revoke", help="end a key, given the key itself or its id")
    revoke.add_argument("key_or_id")
    update = keys_commands.add_parser("update", help="change a key's limits (a value of default: the deployment's)")
    update.add_argument("key_id", help="the key's id (or the key itself)")
    update.add_argument("--rate", help="requests allowed, e.g. 600/minute, or default")
    update.add_argument("--max-jobs", help="the tenant's jobs queued plus running, or default")
    update.add_argument("--max-priority", help="the highest job priority, or default")
