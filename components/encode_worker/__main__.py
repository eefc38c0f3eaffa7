"""``python -m triptych.components.encode_worker`` (or ``triptych encode``)"""

import dataclasses
from collections.abc import Sequence

from triptych.components.encode_worker.handler import EncodeHandler
from triptych.components.encoder import cached_encoder
from triptych.components.topology import ENCODE, ENCODE_SENDS_TO
from triptych.components.worker import run_worker, worker_config, worker_parser
from triptych.engines import Engine, encode_engine
from triptych.protocol import GenerateRequest
from triptych.runtime import Runtime, Service
from triptych.runtime.flags import FlagParser
from triptych.transfer import EmbeddingTransport


def parser() -> FlagParser:
    """The encode worker's flags."""
    return worker_parser(
        "triptych encode",
        "An encode worker: runs the vision tower on a request's images, keeps the embeddings "
        "in NIXL-registered memory and forwards the request to a decode instance.",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and serve until stopped."""
    config = worker_config(parser().parse_args(argv), ENCODE)
    config = dataclasses.replace(config, engine=config.engine.encoding())

    async def setup(
        runtime: Runtime, service: Service, transport: EmbeddingTransport
    ) -> Sequence[Engine]:
        engine = cached_encoder(config, encode_engine(config.engine))
        await engine.start()
        handler = EncodeHandler(engine, await runtime.client(ENCODE_SENDS_TO), transport)
        service.add_endpoint("generate", GenerateRequest, handler.generate)
        return [engine]

    run_worker(config, ENCODE, setup)


if __name__ == "__main__":
    main()
