"""``python -m triptych.components.frontend``"""

import asyncio
import logging

from aiohttp import web

from triptych.components.frontend.config import FrontendConfig
from triptych.components.frontend.images import ImageLoader
from triptych.components.frontend.prompt import Preprocessor
from triptych.components.frontend.server import Frontend
from triptych.components.frontend.videos import VideoLoader
from triptych.runtime import Runtime
from triptych.runtime.entry import configure_logging, serve, serving
from triptych.runtime.port_file import write_port_file
from triptych.transfer import TransferAgent

log = logging.getLogger("triptych.frontend")


def main() -> None:
    """Parse flags and serve HTTP until stopped."""
    args = FrontendConfig.parser().parse_args()
    configure_logging(args.log_level, args.log_format)
    model_path = args.model_path
    if not model_path:
        from triptych.models.tiny import default_model_path

        model_path = str(default_model_path())
    config = FrontendConfig.from_args(args, model_path)

    async def run(stop: asyncio.Event) -> int:
        loader = ImageLoader(config.images)
        videos = VideoLoader(config.videos, loader.fetcher)
        preprocessor = Preprocessor(config.model_path, loader, videos)
        agent = TransferAgent("frontend", "cpu", config.transfer_pool_mb << 20)
        await agent.start()
        try:
            async with Runtime(config.runtime, name="frontend") as runtime:
                stages = {name: await runtime.client(name) for name in config.stages}
                stages[config.stages[0]].max_load = config.affinity_max_load
                frontend = Frontend(config, runtime, preprocessor, stages, agent)
                runner = web.AppRunner(frontend.app(), handler_cancellation=True, access_log=None)
                await runner.setup()
                # A deeper accept queue than the default 128: a burst waits to be refused
                # with a 503 instead of having its connections dropped and retried.
                site = web.TCPSite(runner, config.http_host, config.http_port, backlog=1024)
                await site.start()
                port = int(runner.addresses[0][1])
                if config.port_file:
                    write_port_file(config.port_file, {"http": port})
                log.info(
                    "frontend (%s, model '%s') on http://%s:%d",
                    config.topology,
                    config.served_model_name,
                    config.http_host,
                    port,
                )
                try:
                    return await serving(stop, runtime)
                finally:
                    await runner.cleanup()
                    await loader.close()
        finally:
            await agent.close()

    serve(run)


if __name__ == "__main__":
    main()
