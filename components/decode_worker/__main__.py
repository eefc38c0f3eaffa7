"""``python -m triptych.components.decode_worker`` (or ``triptych decode``)

``--disaggregation-mode decode`` (E/P/D, P/D): bootstrap with a prefill worker, decode from
the KV cache it hands over. ``--disaggregation-mode agg`` (E/PD, EPD): prefill and decode here;
with ``--dedicated-mm-encoder`` images come encoded from an encode worker, otherwise this worker
encodes them itself.
"""

from collections.abc import Sequence

from triptych.components.decode_worker.handler import AggregatedHandler, DisaggregatedHandler
from triptych.components.encoder import add_encoder_flag, encodes_inline, serve_prefilling
from triptych.components.topology import DECODE, DECODE_CALLS
from triptych.components.worker import run_worker, worker_config, worker_parser
from triptych.engines import (
    Engine,
    aggregated_engine,
    decode_engine,
)
from triptych.protocol import GenerateRequest
from triptych.runtime import Runtime, Service
from triptych.runtime.flags import FlagParser
from triptych.transfer import EmbeddingTransport


def parser() -> FlagParser:
    """The decode worker's flags."""
    flags = worker_parser(
        "triptych decode",
        "A decode worker: gets each request's KV cache from a prefill instance and streams "
        "tokens to the frontend; with --disaggregation-mode agg it prefills (and encodes) "
        "itself.",
    )
    flags.add_argument(
        "--disaggregation-mode",
        choices=("decode", "agg"),
        default="decode",
        help="decode: the KV cache comes from a prefill worker (E/P/D, P/D); agg: prefill "
        "and decode here (E/PD, EPD)",
    )
    add_encoder_flag(flags)
    return flags


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and serve until stopped."""
    args = parser().parse_args(argv)
    config = worker_config(args, DECODE)

    async def setup(
        runtime: Runtime, service: Service, transport: EmbeddingTransport
    ) -> Sequence[Engine]:
        if args.disaggregation_mode == "decode":
            engine = decode_engine(config.engine, transport.agent)
            await engine.start()
            prefill = await runtime.client(DECODE_CALLS)
            affinity = args.prefix_routing == "affinity"
            disaggregated = DisaggregatedHandler(engine, prefill, affinity)
            service.add_endpoint("generate", GenerateRequest, disaggregated.generate)
            return [engine]
        agg = aggregated_engine(config.engine)
        await agg.start()
        return await serve_prefilling(
            config, agg, AggregatedHandler, service, transport, dedicated=args.dedicated_mm_encoder
        )

    agg = args.disaggregation_mode == "agg"
    inline = agg and encodes_inline(config, args.dedicated_mm_encoder)
    run_worker(config, DECODE, setup, encodes_inline=inline)


if __name__ == "__main__":
    main()
