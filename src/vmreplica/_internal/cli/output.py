"""What every command shares: ``-c``, ``-o``, ``--property``, ``--stdin`` and the three formats.

``table`` is for people, ``list`` is one ``Key : Value`` block per object (like PowerShell's
``Format-List *``), ``json`` is an array of objects with the contract's field names, so that
``… -o json | vmreplica … --stdin`` works like a PowerShell pipeline.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from vmreplica._internal.config import cli_config_path
from vmreplica._internal.models import Model
from vmreplica.client import Client
from vmreplica.errors import InvalidArgument

F = TypeVar("F", bound=Callable[..., Any])

FORMATS = ("table", "list", "json")


def computer_option(f: F) -> F:
    return click.option(
        "-c",
        "--computer-name",
        "computer_names",
        multiple=True,
        metavar="NAME",
        help="Host to talk to, as named in the CLI config (repeatable); default: the local agent.",
    )(f)


def output_options(f: F) -> F:
    f = click.option(
        "-o",
        "--output",
        "output",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="Output format.",
    )(f)
    f = click.option(
        "--property",
        "properties",
        metavar="NAME[,NAME…]",
        help="Fields to show, by their JSON names.",
    )(f)
    return f


def stdin_option(f: F) -> F:
    return click.option(
        "--stdin",
        "from_stdin",
        is_flag=True,
        help="Take the objects to change as JSON from standard input (as printed by -o json).",
    )(f)


def absolute(path: str) -> str:
    """A path the caller typed, made absolute here: the agent's working directory is not the
    caller's, and it would read a relative path against its own."""
    return str(Path(path).absolute()) if path else path


def clients(computer_names: Sequence[str]) -> list[Client]:
    if not computer_names:
        return [Client.connect(None)]
    return [Client.connect(name) for name in dict.fromkeys(computer_names)]


def read_stdin_objects() -> list[dict[str, Any]]:
    text = sys.stdin.read().strip()
    if not text:
        raise InvalidArgument("--stdin: no objects on standard input")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"--stdin: not JSON ({e.msg} at line {e.lineno})") from e
    objects = data if isinstance(data, list) else [data]
    if not all(isinstance(o, dict) for o in objects):
        raise InvalidArgument("--stdin: expected JSON objects, as printed by -o json")
    return objects


def client_for_object(obj: dict[str, Any], computer_names: Sequence[str]) -> Client:
    """Where a piped object goes: ``-c`` if given, else the host it came from, else local."""
    if computer_names:
        return Client.connect(computer_names[0])
    name = obj.get("computer_name")
    if isinstance(name, str) and _cli_config_knows(name):
        return Client.connect(name)
    return Client.connect(None)


def _cli_config_knows(name: str) -> bool:
    path = cli_config_path()
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            hosts = tomllib.load(f).get("hosts", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return isinstance(hosts, dict) and name in hosts


def _choose_fields(model_cls: type[Model], properties: str | None, output: str) -> list[str]:
    names = list(model_cls.field_names())
    if properties:
        wanted = [p.strip() for p in properties.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in names]
        if unknown:
            raise InvalidArgument(
                f"unknown property {', '.join(unknown)}: choose from {', '.join(names)}"
            )
        return wanted
    if output == "table" and model_cls.table_fields:
        return list(model_cls.table_fields)
    return names


def header(name: str) -> str:
    short = {
        "computer_name": "Host",
        "replication_enabled": "Enabled",
        "allowed_authentication_type": "Auth",
    }
    return short.get(name) or "".join(part.capitalize() for part in name.split("_"))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return str(value)


def render(
    objects: Iterable[Model], model_cls: type[Model], output: str, properties: str | None
) -> None:
    items = list(objects)
    fields = _choose_fields(model_cls, properties, output)
    rows = [{f: obj.to_json().get(f) for f in fields} for obj in items]
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if output == "list":
        width = max((len(f) for f in fields), default=0)
        blocks = ["\n".join(f"{f.ljust(width)} : {_text(row[f])}" for f in fields) for row in rows]
        if blocks:
            click.echo("\n\n".join(blocks))
        return
    from rich.console import Console  # tables only: -o json and list do without its import
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for f in fields:
        table.add_column(header(f), overflow="fold")
    for row in rows:
        table.add_row(*(_text(row[f]) for f in fields))
    width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else 200
    Console(width=width, highlight=False).print(table)


def collect(
    computer_names: Sequence[str], fetch: Callable[[Client], Model | list[Model]]
) -> list[Model]:
    """Run ``fetch`` on each host named with ``-c`` (or the local agent); rows in host order."""
    out: list[Model] = []
    for client in clients(computer_names):
        result = fetch(client)
        out.extend(result if isinstance(result, list) else [result])
    return out


def common(f: F) -> F:
    """``-c``, ``-o`` and ``--property``, in that order in ``--help``."""
    return computer_option(output_options(f))
