"""``blaze keys``: an operator makes, lists, changes and revokes API keys in Redis; the secret
is printed once, last, and only its hash is stored. Real Redis, the real CLI process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from blaze_jobs import api_keys, audit
from blaze_jobs.settings import Settings
from tests.conftest import REDIS_URL, own_prefix


@pytest.fixture()
def where() -> Iterator[dict[str, Any]]:
    """A fresh key prefix, the settings of it, and a Redis client."""
    with own_prefix("keys") as prefix, redis.Redis.from_url(REDIS_URL) as client:
        yield {"prefix": prefix, "settings": Settings(redis_url=REDIS_URL, redis_prefix=prefix), "redis": client}


def blaze_keys(where: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``blaze keys ARGS`` against the test's prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAZE_")}
    env.update(BLAZE_REDIS_URL=REDIS_URL, BLAZE_REDIS_PREFIX=where["prefix"])
    return subprocess.run(
        [sys.executable, "-m", "blaze_jobs.cli", "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def create(where: dict[str, Any], *args: str) -> str:
    done = blaze_keys(where, "create", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


def test_create_prints_the_key_last_and_stores_only_its_hash(where: dict[str, Any]) -> None:
    # When an operator makes a key with limits
    done = blaze_keys(
        where, "create", "--tenant", "acme", "--name", "ci", "--rate", "600/minute", "--max-jobs", "10", "--max-priority", "5"
    )

    # Then the output names its fields, and the last line is the key alone
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    secret = lines[-1]
    assert secret.startswith("bz_live_") and " " not in secret and len(secret) >= len("bz_live_") + 22
    fields = dict(line.split(None, 1) for line in lines[:-2])
    assert fields["tenant"] == "acme" and fields["name"] == "ci" and fields["admin"] == "no"
    assert fields["rate"] == "600/minute" and fields["max_jobs"] == "10" and fields["max_priority"] == "5"

    # And the API finds it by its secret, with its limits
    key = api_keys.get_key(where["redis"], where["settings"], secret)
    assert key is not None and key.id == fields["id"]
    assert (key.tenant, key.name, key.admin, key.rate, key.max_jobs, key.max_priority) == (
        "acme",
        "ci",
        False,
        "600/minute",
        10,
        5,
    )

    # And nothing under the prefix holds the secret: only its SHA-256 names the key
    stored = []
    for name in where["redis"].scan_iter(match=f"{where['prefix']}*"):
        kind = where["redis"].type(name)
        stored.append(name)
        if kind == b"hash":
            stored.extend(b for pair in where["redis"].hgetall(name).items() for b in pair)
        elif kind == b"stream":
            stored.append(str(where["redis"].xrange(name)).encode())
        elif kind == b"string":
            stored.append(where["redis"].get(name))
    assert stored and not any(secret.encode() in value for value in stored if isinstance(value, bytes))
    assert where["redis"].exists(f"{where['prefix']}api-key:{api_keys.key_hash(secret)}")


def test_an_admin_key_and_one_with_the_deployment_defaults(where: dict[str, Any]) -> None:
    # When an operator makes an admin key without limits
    secret = create(where, "--tenant", "ops", "--name", "root", "--admin")

    # Then it is an admin, with the deployment's default rate and quota and any priority
    key = api_keys.get_key(where["redis"], where["settings"], secret)
    defaults = Settings()
    assert key is not None and key.admin
    assert (key.rate, key.max_jobs, key.max_priority) == (defaults.default_rate, defaults.default_max_jobs, None)


def test_list_shows_keys_without_their_secrets(where: dict[str, Any]) -> None:
    # Given keys of two tenants
    secrets = [create(where, "--tenant", "acme", "--name", "ci"), create(where, "--tenant", "globex", "--name", "batch")]

    # When an operator lists them, all or one tenant's
    everything = blaze_keys(where, "list")
    acme = blaze_keys(where, "list", "--tenant", "acme")

    # Then each key is a row, and no secret is printed
    assert everything.returncode == 0 and acme.returncode == 0
    assert len(everything.stdout.splitlines()) == 3 and "acme" in everything.stdout and "globex" in everything.stdout
    assert len(acme.stdout.splitlines()) == 2 and "globex" not in acme.stdout
    assert not any(secret in everything.stdout for secret in secrets)
    assert "bz_live_" not in everything.stdout


@pytest.mark.parametrize("by", ["key", "id"])
def test_revoke_by_the_key_or_its_id(where: dict[str, Any], by: str) -> None:
    # Given a key
    secret = create(where, "--tenant", "acme", "--name", "leaving")
    key = api_keys.get_key(where["redis"], where["settings"], secret)
    assert key is not None

    # When an operator revokes it, by the key itself or by its id
    done = blaze_keys(where, "revoke", secret if by == "key" else key.id)

    # Then it is gone: its secret finds nothing, the list is empty, a second revoke is an error
    assert done.returncode == 0, done.stderr
    assert key.id in done.stdout and secret not in done.stdout
    assert api_keys.get_key(where["redis"], where["settings"], secret) is None
    assert api_keys.list_keys(where["redis"], where["settings"]) == []
    again = blaze_keys(where, "revoke", key.id)
    assert again.returncode == 2 and "no API key" in again.stderr

    # And the audit trail says the CLI made and revoked it, from this host
    entries, _ = audit.read(where["redis"], where["settings"])
    assert [(e["action"], e["target"], e["who"]["key_id"], e["address"]) for e in entries] == [
        ("key.revoke", key.id, "cli", socket.gethostname()),
        ("key.create", key.id, "cli", socket.gethostname()),
    ]


def test_update_changes_limits_and_default_restores_them(where: dict[str, Any]) -> None:
    # Given a key with a rate of its own
    secret = create(where, "--tenant", "acme", "--name", "ci", "--rate", "10/second")
    key = api_keys.get_key(where["redis"], where["settings"], secret)
    assert key is not None

    # When an operator gives it a quota and a priority bound, and puts its rate back to the default
    done = blaze_keys(where, "update", key.id, "--max-jobs", "3", "--max-priority", "2", "--rate", "default")

    # Then the key has the new limits, the same secret, and the change is in the audit trail
    assert done.returncode == 0, done.stderr
    now = api_keys.get_key(where["redis"], where["settings"], secret)
    assert now is not None
    assert (now.rate, now.max_jobs, now.max_priority) == (Settings().default_rate, 3, 2)
    entries, _ = audit.read(where["redis"], where["settings"], limit=1)
    assert entries[0]["action"] == "key.update" and entries[0]["target"] == f"{key.id} rate=default max_jobs=3 max_priority=2"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("create", "--tenant", "a b", "--name", "ci"), "tenant"),
        (("create", "--tenant", "acme", "--name", "x" * 65), "name"),
        (("create", "--tenant", "acme", "--name", "ci", "--rate", "lots"), "rate"),
        (("create", "--tenant", "acme", "--name", "ci", "--max-jobs", "0"), "max_jobs"),
        (("create", "--tenant", "acme", "--name", "ci", "--max-priority", "-1"), "max_priority"),
        (("update", "key_000000000000", "--max-jobs", "many"), "max_jobs"),
    ],
)
def test_a_bad_field_is_named_and_exits_2(where: dict[str, Any], args: tuple[str, ...], field: str) -> None:
    # When an operator gives a bad value
    done = blaze_keys(where, *args)

    # Then the CLI says which field, exits 2, and stores nothing
    assert done.returncode == 2, done.stdout
    assert f"blaze keys: {field}:" in done.stderr
    assert api_keys.list_keys(where["redis"], where["settings"]) == []


def test_an_unknown_key_to_update_or_an_unreachable_redis_exits_2(where: dict[str, Any]) -> None:
    # When an operator updates a key that does not exist
    missing = blaze_keys(where, "update", "key_000000000000", "--max-jobs", "5")

    # Then it is an error that says so
    assert missing.returncode == 2 and "no API key key_000000000000" in missing.stderr

    # And with no Redis at BLAZE_REDIS_URL, the CLI says where it looked
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAZE_")}
    unreachable = "redis://127.0.0.1:1/0"
    done = subprocess.run(
        [sys.executable, "-m", "blaze_jobs.cli", "keys", "list"],
        env={**env, "BLAZE_REDIS_URL": unreachable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and unreachable in done.stderr and done.stdout == ""
