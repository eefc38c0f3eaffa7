"""``python -m triptych.components.encode_worker``"""

import dataclasses
from collections.abc import Sequence

from triptych.components.encode_worker.handler import EncodeHandler
from triptych.components.worker import cached_encoder, run_worker, worker_config, worker_parser
from triptych.engines import Engine, encode_engine
from triptych.protocol import GenerateRequest
from triptych.runtime import Runtime, Service
from triptych.transfer import EmbeddingTransport


def main() -> None:
    """Parse flags and serve until stopped."""
    config = worker_config(worker_parser("triptych encode worker").parse_args())
    config = dataclasses.replace(config, engine=config.engine.encoding())

    async def setup(
        runtime: Runtime, service: Service, transport: EmbeddingTransport
    ) -> Sequence[Engine]:
        engine = cached_encoder(config, encode_engine(config.engine))
        await engine.start()
        handler = EncodeHandler(engine, await runtime.client("decode"), transport)
        service.add_endpoint("generate", GenerateRequest, handler.generate)
        return [engine]

    run_worker(config, "encode", setup)


if __name__ == "__main__":
    main()
