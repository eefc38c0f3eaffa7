"""``python -m triptych.components.prefill_worker``

With ``--dedicated-mm-encoder`` images arrive encoded from an encode worker (E/P/D); without
it this worker encodes them itself (P/D serving a VLM).
"""

from collections.abc import Sequence

from triptych.components.prefill_worker.handler import PrefillHandler
from triptych.components.worker import has_vision, run_worker, worker_config, worker_parser
from triptych.engines import EncodeEngine, Engine, encode_engine, prefill_engine
from triptych.protocol import GenerateRequest
from triptych.runtime import Runtime, Service
from triptych.transfer import EmbeddingTransport


def main() -> None:
    """Parse flags and serve until stopped."""
    parser = worker_parser("triptych prefill worker")
    parser.add_argument(
        "--dedicated-mm-encoder",
        action="store_true",
        help="images arrive encoded from an encode worker",
    )
    args = parser.parse_args()
    config = worker_config(args)

    async def setup(
        runtime: Runtime, service: Service, transport: EmbeddingTransport
    ) -> Sequence[Engine]:
        engine = prefill_engine(config.engine, transport.agent)
        await engine.start()
        engines: list[Engine] = [engine]
        encoder: EncodeEngine | None = None
        if not args.dedicated_mm_encoder and has_vision(config):
            encoder = encode_engine(config.engine)
            await encoder.start()
            engines.append(encoder)
        handler = PrefillHandler(engine, transport, encoder)
        service.add_endpoint("generate", GenerateRequest, handler.generate)
        return engines

    run_worker(config, "prefill", setup)


if __name__ == "__main__":
    main()
