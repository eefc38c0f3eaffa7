"""``python -m triptych.components.prefill_worker``"""

from collections.abc import Sequence

from triptych.components.prefill_worker.handler import PrefillHandler
from triptych.components.worker import run_worker, worker_config, worker_parser
from triptych.engines import Engine, prefill_engine
from triptych.protocol import GenerateRequest
from triptych.runtime import Runtime, Service


def main() -> None:
    """Parse flags and serve until stopped."""
    parser = worker_parser("triptych prefill worker")
    parser.add_argument(
        "--dedicated-mm-encoder",
        action="store_true",
        help="images arrive encoded from an encode worker",
    )
    config = worker_config(parser.parse_args())

    async def setup(runtime: Runtime, service: Service) -> Sequence[Engine]:
        engine = prefill_engine(config.engine)
        await engine.start()
        service.add_endpoint("generate", GenerateRequest, PrefillHandler(engine).generate)
        return [engine]

    run_worker(config, "prefill", setup)


if __name__ == "__main__":
    main()
