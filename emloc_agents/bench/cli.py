"""`emloc bench`: argument parsing for ``run_bench``. Bad input -> one line on stderr, exit 2.

``--task`` takes a task name (the bundled sst2, trec, agnews, rte, trec50, or one in ``$EMLOC_DATA_DIR``) or a
task folder; an unknown name is an error that lists the names known.

``--compare`` is a flag: after the run, print the ``compare`` lines of that run on stdout.
(To compare an existing run, load its ``summary.json`` and call ``emloc_agents.bench.compare``.)
``--scaling`` runs the scaling study (``scaling.py``) over ``--shots`` for each ``--task`` with the
first seed instead of the accuracy study; ``--methods/--limit/--ratio/--scoring/--compare`` do not apply.

``--agents`` runs the agent study (``agents.py``): LangChain's ``create_agent`` on ``--model`` with three
skills (on ``--skill-model``, default the same model; the first of ``--shots`` and ``--seeds``) and two
plain tools over the bundled agent requests (``--limit``: the first N); no ``--task``. ``--tool-selector``
adds the few-shot tool selector (``emloc_agents.middleware``) on the agent's model; ``--return-direct``
makes the skill tools end the agent's turn on their answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NoReturn

from ..engine import PromptError, UnsupportedModelError
from ..models.sources import EMBEDDED
from ..skills import SkillError
from ..tasks import available_tasks
from .compare import compare
from .methods import METHODS, order_methods
from .run import SCORINGS, BenchError, run_bench


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse would print usage too)
        raise BenchError(message)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _methods(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    try:
        order_methods(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="emloc bench", description="Accuracy, fidelity and cost of EMLoC memories vs baselines.")
    p.add_argument("--task", action="append", default=None, metavar="NAME|DIR",
                   help=f"task name ({', '.join(available_tasks())}) or task folder (repeatable)")
    p.add_argument("--model", default="default", help=f"default | {' | '.join(EMBEDDED)} | tiny-llama | DIR")
    p.add_argument("--methods", type=_methods, default="zero-shot,full-icl,emloc",
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--shots", type=_ints, default="16", help="comma list of demonstration counts")
    p.add_argument("--seeds", type=_ints, default="0", help="comma list of demonstration-sampling seeds")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N test items (default: all)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default results/bench-<timestamp>)")
    p.add_argument("--ratio", type=_floats, default=None,
                   help="keep ratio of uniform/snapkv/streaming-llm/random/kvzip(-heads, -global)/fewer-shots; a comma list "
                        "runs each once per ratio, a fidelity curve (default: EMLoC's kept ratio for the "
                        "same shots/seed when emloc runs, else 0.2)")
    p.add_argument("--scoring", choices=SCORINGS, default="loglik",
                   help="loglik: argmax label log-likelihood; generate: label the greedy answer starts with")
    p.add_argument("--compare", action="store_true", help="print the headline ratios after the run")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--scaling", action="store_true",
                   help="instead: peak RSS, cold/warm time and bytes of EMLoC vs full KV over --shots (first seed)")
    p.add_argument("--compression", choices=("auto", "chunks", "context", "fitted"), default="auto",
                   help="--scaling: the EMLoC memory's compression (EMLoCConfig.compression)")
    p.add_argument("--agents", action="store_true",
                   help="the agent study: create_agent with skill tools on --model over the bundled requests")
    p.add_argument("--skill-model", default=None, metavar="NAME|DIR",
                   help="--agents: the model the skills answer on (default: --model)")
    p.add_argument("--requests", default="study", metavar="study|heldout|heldout2|FILE",
                   help="--agents: the request set (bundled by name, or a JSON file of requests)")
    p.add_argument("--tool-selector", action="store_true",
                   help="--agents: choose each turn's tool (or none) with FewShotToolSelectorMiddleware and the "
                        "package's example requests")
    p.add_argument("--return-direct", action="store_true",
                   help="--agents: skill tools end the agent's turn on their answer (LangChain's return_direct)")
    p.add_argument("--serve", action="store_true",
                   help="instead: requests/s and p50/p95 latency of `emloc serve` at 1, 4 and 16 concurrent clients "
                        "(run by the emloc command: `emloc bench --serve --help`)")
    return p


def bench_main(argv: list[str] | None = None) -> int:
    from ..models.sources import ModelSourceError

    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.serve:
            raise BenchError("the serving benchmark runs from the emloc command: emloc bench --serve")
        kind = "agents" if args.agents else "scaling" if args.scaling else "bench"
        out = args.out or f"results/{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        if args.agents:
            return _agents(args, out)
        if not args.task:
            raise BenchError("the following arguments are required: --task (or --agents)")
        if args.scaling:
            if not args.seeds:
                raise BenchError("no seeds given")
            from .scaling import run_scaling

            rows = run_scaling(args.task, model=args.model, shots=args.shots, seed=args.seeds[0], out=out,
                               device=args.device, compression=args.compression)
            print(f"emloc bench: {len(rows)} scaling rows written to {out}/scaling.json", file=sys.stderr)
            return 0
        rows = run_bench(
            args.task, model=args.model, methods=args.methods, shots=args.shots, seeds=args.seeds,
            limit=args.limit, out=out, ratio=args.ratio, scoring=args.scoring, device=args.device,
        )
    except (BenchError, SkillError, PromptError, ModelSourceError, UnsupportedModelError, FileNotFoundError) as e:
        print(f"emloc bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"emloc bench: {len(rows)} rows written to {out}/summary.json", file=sys.stderr)
    if args.compare:
        print("\n".join(compare(rows)))
    return 0


def _agents(args: argparse.Namespace, out: str) -> int:
    from .agents import markdown, run_agents

    if not args.shots or not args.seeds:
        raise BenchError("--agents needs --shots and --seeds")
    result = run_agents(args.model, skill_model=args.skill_model, shots=args.shots[0], seed=args.seeds[0],
                        limit=args.limit, out=out, tool_selector=args.tool_selector,
                        requests=args.requests, return_direct=args.return_direct)
    print(markdown([result]), end="")
    print(f"emloc bench: {result['summary']['n']} agent requests written to {out}/agents.json", file=sys.stderr)
    return 0
