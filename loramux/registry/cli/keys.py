"""`loramux keys create|list|revoke`: API keys (bearer tokens) of tenants. A token is printed once, never stored."""

from __future__ import annotations

import argparse
import time

from loramux.registry.cli.common import add_storage_arguments, open_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key for a tenant and print its token once")
    create.add_argument("tenant")
    create.add_argument("--description", default="", help="a note to recognise the key by")
    listing = actions.add_parser("list", help="list keys (ids, never tokens)")
    listing.add_argument("tenant", nargs="?", default=None)
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    for sub in (create, listing, revoke):
        add_storage_arguments(sub)


def run(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    if args.action == "create":
        key, token = registry.create_key(args.tenant, args.description)
        print(token)
        print(f"key {key.key_id} for tenant {key.tenant}: the token above is shown only now", flush=True)
    elif args.action == "revoke":
        registry.revoke_key(args.key_id)
        print(f"revoked key {args.key_id}")
    else:
        for key in registry.list_keys(args.tenant):
            state = f"revoked {_date(key.revoked_at)}" if key.revoked_at else "active"
            print(f"{key.key_id}\t{key.tenant}\t{state}\tcreated {_date(key.created_at)}\t{key.description}")
    return 0


def _date(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))
