"""kiln-generate: sample text from a kiln checkpoint or a kiln-export directory.

    kiln-generate checkpoints/kiln/step_000001000 --prompt 'def main(' --max-new-tokens 200
    kiln-generate exports/kiln-1000 --prompt 'import ' --temperature 0      # greedy
    kiln-generate checkpoints/kiln --prompt 'class ' --top-k 50 --seed 7    # newest checkpoint

The tokenizer is the one the training data was written with: a checkpoint's from the dataset
manifest its run config names, an export's from the files kiln-export wrote. The same seed gives
the same text; --temperature 0 picks the most likely token every time. Runs on the CPU in fp32.
Prints the prompt and its continuation (up to the end-of-document token, unless --no-stop-at-eos).
"""

from __future__ import annotations

import argparse
import sys

from kiln.errors import KilnError
from kiln.launch.env import prepare_checkpoint_tool


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="CHECKPOINT_OR_EXPORT",
                   help="a step_* checkpoint, a run directory (its newest checkpoint), or a kiln-export directory")
    p.add_argument("--prompt", required=True, help="the text to continue ('' starts a new document)")
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=200, help="tokens to add (default 200)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.8,
                   help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=_non_negative_int, default=200,
                   help="sample among the k most likely tokens; 0 = all (default 200)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed: the same seed gives the same text")
    p.add_argument("--tokenizer", default=None, metavar="{byte,PATH}",
                   help="use this tokenizer instead of the data's (byte, or a tokenizer.json path)")
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                   help="keep generating past the end-of-document token")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_checkpoint_tool()
    # Lazy: these import torch, which must follow prepare_checkpoint_tool (TQDM_DISABLE); --help stays quick.
    from kiln.checkpoint.tokenizer_files import tokenizer_from_option
    from kiln.engine.build import captured_stdout
    from kiln.generate import generate_text, load_model

    try:
        tokenizer = tokenizer_from_option(args.tokenizer) if args.tokenizer else None
        with captured_stdout():  # DeepSpeed's consolidation chatter
            model, tokenizer, _ = load_model(args.source, tokenizer)
    except KilnError as e:
        print(f"kiln-generate: {e}", file=sys.stderr)
        return 2
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k or None, seed=args.seed,
                         stop_at_eos=args.stop_at_eos)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
