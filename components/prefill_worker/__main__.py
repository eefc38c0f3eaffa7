"""``python -m triptych.components.prefill_worker`` (or ``triptych prefill``)

With ``--dedicated-mm-encoder`` images arrive encoded from an encode worker (E/P/D); without
it this worker encodes them itself (P/D serving a VLM).
"""

from collections.abc import Sequence

from triptych.components.encoder import add_encoder_flag, encodes_inline, serve_prefilling
from triptych.components.prefill_worker.handler import PrefillHandler
from triptych.components.topology import PREFILL
from triptych.components.worker import run_worker, worker_config, worker_parser
from triptych.engines import Engine, prefill_engine
from triptych.runtime import Runtime, Service
from triptych.runtime.flags import FlagParser
from triptych.transfer import EmbeddingTransport


def parser() -> FlagParser:
    """The prefill worker's flags."""
    flags = worker_parser(
        "triptych prefill",
        "A prefill worker: prefills requests (with their image embeddings) and hands the KV "
        "cache to decode through a bootstrap room.",
    )
    add_encoder_flag(flags)
    return flags


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and serve until stopped."""
    args = parser().parse_args(argv)
    config = worker_config(args, PREFILL)

    async def setup(
        runtime: Runtime, service: Service, transport: EmbeddingTransport
    ) -> Sequence[Engine]:
        engine = prefill_engine(config.engine, transport.agent)
        await engine.start()
        service.announce(engine.bootstrap_metadata())  # decode reaches rooms without asking
        return await serve_prefilling(
            config, engine, PrefillHandler, service, transport, dedicated=args.dedicated_mm_encoder
        )

    inline = encodes_inline(config, args.dedicated_mm_encoder)
    run_worker(config, PREFILL, setup, encodes_inline=inline)


if __name__ == "__main__":
    main()
