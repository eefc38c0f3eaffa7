"""``python -m triptych.components.frontend`` (or ``triptych frontend``)"""

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from triptych.components.frontend.config import FrontendConfig
from triptych.components.frontend.group import Followers, Group
from triptych.components.frontend.http import HttpServer
from triptych.components.frontend.images import ImageLoader
from triptych.components.frontend.middleware import refusal
from triptych.components.frontend.prompt import Preprocessor
from triptych.components.frontend.server import Frontend
from triptych.components.frontend.template import read_template
from triptych.components.frontend.videos import VideoLoader
from triptych.models.checkpoint import CheckpointError, Needs, resolve_checkpoint
from triptych.runtime import Runtime
from triptych.runtime.entry import (
    configure_logging,
    is_port_in_use,
    port_in_use,
    port_taken,
    serve,
    serving,
    settle_heap,
)
from triptych.runtime.port_file import write_port_file
from triptych.transfer import TransferAgent

log = logging.getLogger("triptych.frontend")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and serve HTTP until stopped."""
    args = FrontendConfig.parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    model = args.model_path
    if not model:
        from triptych.models.tiny import default_model_path

        model = str(default_model_path())
    try:
        checkpoint = resolve_checkpoint(model, args.revision, Needs.TOKENIZER)
        chat_template = read_template(args.chat_template) if args.chat_template else None
    except (CheckpointError, ValueError) as error:
        sys.exit(f"triptych frontend: {error}")
    config = dataclasses.replace(
        FrontendConfig.from_args(args, checkpoint.path, checkpoint.name),
        chat_template=chat_template,
    )
    if config.frontend_processes < 1:
        sys.exit("triptych frontend: --frontend-processes must be 1 or more")

    async def run(stop: asyncio.Event) -> int:
        loader = ImageLoader(config.images)
        videos = VideoLoader(config.videos, loader.fetcher)
        preprocessor = Preprocessor(
            config.model_path, loader, videos, config.chat_template, config.model_sampling_defaults
        )
        agent = TransferAgent("frontend", "cpu", config.transfer_pool_mb << 20)
        await agent.start()
        try:
            async with Runtime(config.runtime, name="frontend") as runtime:
                stages = {name: await runtime.client(name) for name in config.stages}
                stages[config.stages[0]].max_load = config.affinity_max_load
                frontend = Frontend(config, runtime, preprocessor, stages, agent)
                http = HttpServer(frontend.handler(), refusal, config.max_body_bytes)
                followers: Followers | None = None
                try:
                    settle_heap()
                    port = await listen(http, config, leads=args.frontend_group is None)
                    if config.frontend_processes > 1:
                        followers, frontend.group = await _group(
                            config, args.frontend_group, port, argv, stop
                        )
                    if config.port_file:
                        write_port_file(config.port_file, {"http": port})
                    log.info(
                        "frontend (%s, model '%s') on http://%s:%d%s",
                        config.topology,
                        config.served_model_name,
                        config.http_host,
                        port,
                        f" ({config.frontend_processes} processes)" if followers else "",
                    )
                    return await serving(stop, runtime)
                finally:
                    # The followers drain while this process does.
                    grace = config.drain_grace_s
                    stopped = asyncio.ensure_future(followers.stop(grace)) if followers else None
                    await http.close(grace)
                    if stopped is not None:
                        await stopped
                    if frontend.group is not None:
                        await frontend.group.leave()
                    await loader.close()
        finally:
            await agent.close()

    serve(run, "frontend")


async def _group(
    config: FrontendConfig,
    directory: str | None,
    port: int,
    argv: Sequence[str] | None,
    stop: asyncio.Event,
) -> tuple[Followers | None, Group]:
    """Join this process's frontend group: as its leader (no `directory` given), start the
    followers on `port` with this process's flags; as a follower, stop with the leader."""
    followers = None
    if directory is None:
        given = sys.argv[1:] if argv is None else argv
        followers = Followers(given, port, config.frontend_processes)
        directory = str(followers.directory)
    group = Group(Path(directory), config.frontend_processes)
    await group.join(None if followers else stop)
    return followers, group


async def listen(http: HttpServer, config: FrontendConfig, leads: bool = True) -> int:
    """Bind the HTTP port (the one bound is returned); one line, not a traceback, when it is
    taken. A group of frontend processes binds it with SO_REUSEPORT, once its leader has made
    sure nothing else holds it (another group would otherwise share it silently)."""
    # A deeper accept queue than the default 128: a burst waits to be refused with a 503
    # instead of having its connections dropped and retried.
    host, port = config.http_host, config.http_port
    shared = config.frontend_processes > 1
    if shared and leads and port and port_taken(host, port):
        raise port_in_use(host, port, "--http-port")
    try:
        return await http.listen(host, port, 1024, reuse_port=shared)
    except OSError as error:
        if is_port_in_use(error):
            raise port_in_use(host, port, "--http-port") from None
        raise


if __name__ == "__main__":
    main()
