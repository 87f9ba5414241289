"""``jetrun deploy`` and ``jetrun scaling``: put pipelines in the catalogue with their scaling
settings, and read or change a deployed pipeline's scaling through the API."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import anyio
import click
import msgspec

from contracts.scaling import ScalingPatch, ScalingSettings, SettingsChanged
from runtime.infra.nats_auth import Credentials

SETTING_OPTIONS = [
    click.option("--min-replicas", type=click.IntRange(0, 1000), default=None),
    click.option("--max-replicas", type=click.IntRange(1, 1000), default=None),
    click.option(
        "--cooldown",
        "cooldown_s",
        type=click.FloatRange(0),
        default=None,
        help="Seconds a replica idles before it is unloaded.",
    ),
    click.option(
        "--target-concurrency",
        type=click.IntRange(1),
        default=None,
        help="Concurrent runs per replica before another is added.",
    ),
    click.option(
        "--warm",
        "warm",
        multiple=True,
        metavar="HH:MM-HH:MM=N",
        help="Keep N replicas ready in this UTC window; repeatable.",
    ),
]


def _patch(options: dict[str, Any]) -> ScalingPatch:
    warm = options.pop("warm", ())
    fields = {k: v for k, v in options.items() if v is not None}
    if warm:
        fields["warm"] = [_window(w) for w in warm]
    try:
        return msgspec.convert(fields, ScalingPatch)
    except msgspec.ValidationError as err:
        raise click.BadParameter(str(err)) from None


def _window(text: str) -> dict[str, Any]:
    span, _, count = text.partition("=")
    start, _, end = span.partition("-")
    if not count.isdigit():
        raise click.BadParameter(f"{text!r}: expected HH:MM-HH:MM=N", param_hint="--warm")
    return {"start": start, "end": end, "replicas": int(count)}


def with_settings(command: Any) -> Any:
    for option in reversed(SETTING_OPTIONS):
        command = option(command)
    return command


async def deploy_module(
    nats_url: str,
    module: str,
    patch: ScalingPatch,
    replicas: int,
    credentials: Credentials | None = None,
) -> list[str]:
    """Register every pipeline of ``module`` as autoscaled (the decorator's scaling settings,
    else scale-to-zero defaults, then ``patch``). Returns lines to print."""
    from runtime.control.providers import list_pipelines
    from runtime.infra.catalog import Catalog
    from runtime.infra.nats_conn import connect
    from runtime.infra.scalinglog import ScalingLog

    infos = await list_pipelines([module])  # the pipeline code runs in a child, not here
    nc = await connect(nats_url, "jetrun-deploy", credentials)
    try:
        js = nc.jetstream(timeout=5.0)
        catalog, log = Catalog(js, replicas=replicas), ScalingLog(js, replicas=replicas)
        await catalog.ensure()
        await log.ensure()
        lines = []
        for info in infos:
            settings = patch.apply(info.scaling or ScalingSettings())
            await catalog.register(msgspec.structs.replace(info, scaling=settings))
            at = time.time()
            await log.append(
                SettingsChanged(pipeline=info.pointer, at=at, settings=settings, by="deploy")
            )
            lines.append(f"deployed {info.pointer}: {json.dumps(msgspec.to_builtins(settings))}")
        return lines
    finally:
        await nc.close()


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def register(
    main: click.Group,
    nats_option: Decorator,
    replicas_option: Decorator,
    credential_options: Decorator = lambda command: command,
) -> None:
    @main.command()
    @nats_option
    @credential_options
    @replicas_option
    @click.argument("module")
    @with_settings
    def deploy(nats_url: str, replicas: int, module: str, **options: Any) -> None:
        """Deploy the pipelines of MODULE (a .py path or dotted name) into the catalogue,
        autoscaled: they exist with zero replicas until runs arrive; agents with the code
        load them when told. (NATS role: admin.)"""
        seed, ca = options.pop("nats_seed", None), options.pop("nats_ca", None)
        credentials = None
        if seed is not None or ca is not None:
            credentials = Credentials(role="admin", seed_file=seed, ca_file=ca)
        patch = _patch(options)
        try:
            lines = anyio.run(deploy_module, nats_url, module, patch, replicas, credentials)
        except (RuntimeError, ValueError, OSError, msgspec.MsgspecError) as err:
            raise click.ClickException(f"cannot deploy {module}: {err}") from None
        for line in lines:
            click.echo(line)

    @main.command()
    @click.argument("pointer")
    @click.option(
        "--url",
        default=lambda: os.environ.get("JETRUN_URL", "http://127.0.0.1:8080"),
        show_default="$JETRUN_URL or http://127.0.0.1:8080",
    )
    @click.option(
        "--token", default=lambda: os.environ.get("JETRUN_TOKEN", ""), show_default="$JETRUN_TOKEN"
    )
    @click.option("--history", is_flag=True, help="Show the pipeline's scaling events.")
    @with_settings
    def scaling(pointer: str, url: str, token: str, history: bool, **options: Any) -> None:
        """Show POINTER's replicas and scaling settings; with setting options, change them
        (effective at once, no restarts)."""
        import httpx  # here: a service started through this CLI never loads the HTTP client

        patch = _patch(options)
        headers = {"Authorization": f"Bearer {token}"}
        path = f"/v4/pipelines/{pointer}/scaling"
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            if history:
                response = client.get(path + "/history")
            elif patch != ScalingPatch():
                response = client.patch(path, content=msgspec.json.encode(patch))
            else:
                response = client.get(path)
        if response.status_code != 200:
            raise click.ClickException(f"{response.status_code}: {response.text}")
        click.echo(json.dumps(response.json(), indent=2))
