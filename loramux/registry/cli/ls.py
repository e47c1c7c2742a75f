"""`adapters ls [NS]`: the repos you may read, one a line: name, visibility, the newest revision's short commit id,
when it was made."""

from __future__ import annotations

import argparse

from loramux.registry.cli.common import add_hub_arguments

EPILOG = (
    "Each line: NS/NAME, public or private, the newest revision's commit id (its first 12 hex digits), the date. "
    "Every command that takes a revision accepts that short id (7 or more of the first digits, if no other "
    "revision of the repo starts with them): requests as NS/NAME@ID, `adapters pull --revision ID`, "
    "`adapters show --revision ID`, `adapters merge NS/NAME@ID`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("namespace", nargs="?", default=None, metavar="NS", help="only this namespace")
    add_hub_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loramux.registry.client import HF_HUB, HubClientError, call, hub_api, hub_token, hub_url
    from loramux.registry.names import check_part

    url = hub_url(args.hub)
    if args.namespace:
        check_part(args.namespace, "namespace")
    elif url == HF_HUB:
        raise HubClientError("name a namespace to list on huggingface.co: adapters ls NS")
    api = hub_api(url, hub_token(args.token))
    models = call("listing", url, lambda: list(api.list_models(author=args.namespace)))
    for model in models:
        visibility = "private" if model.private else "public"
        modified = model.last_modified.strftime("%Y-%m-%d %H:%M") if model.last_modified else "-"
        print(f"{model.id}\t{visibility}\t{(model.sha or '-')[:12]}\t{modified}")
    return 0
