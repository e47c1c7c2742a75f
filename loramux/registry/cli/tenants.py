"""`loramux tenants create|list|add-namespace`: who owns which namespaces."""

from __future__ import annotations

import argparse

from loramux.registry.cli.common import add_storage_arguments, open_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a tenant owning the namespace of the same name")
    create.add_argument("name")
    actions.add_parser("list", help="list tenants and their namespaces")
    namespace = actions.add_parser("add-namespace", help="give a tenant another namespace")
    namespace.add_argument("tenant")
    namespace.add_argument("namespace")
    for sub in (create, namespace, actions.choices["list"]):
        add_storage_arguments(sub)


def run(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    if args.action == "create":
        registry.create_tenant(args.name)
        print(f"created tenant {args.name} (namespace {args.name}/)")
    elif args.action == "add-namespace":
        registry.add_namespace(args.tenant, args.namespace)
        print(f"tenant {args.tenant} now owns namespace {args.namespace}/")
    else:
        for tenant in registry.list_tenants():
            print(f"{tenant.name}\t{', '.join(registry.store.namespaces_of(tenant.name))}")
    return 0
