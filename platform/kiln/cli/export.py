"""kiln-export: a kiln checkpoint -> a Hugging Face GPT-2 or Llama directory.

    kiln-export checkpoints/kiln/step_000001000 exports/kiln-1000
    kiln-export checkpoints/kiln exports/latest          # a run directory: its newest checkpoint

Writes model.safetensors (fp32 weights gathered from the ZeRO shards, in the Hugging Face layout),
config.json (transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR) loads both: a
GPT2LMHeadModel for model.arch=gpt2, a LlamaForCausalLM for model.arch=llama), the tokenizer the training
data was written with (tokenizer.json + tokenizer_config.json, and kiln_tokenizer.json), and
kiln_export.json (model shape, step, source). A model GPT-2 cannot express (model.bias=false)
is refused with exit code 2. Start a new kiln run from the export with model.init_from=OUT_DIR.
"""

from __future__ import annotations

import argparse
import sys

from kiln.errors import KilnError
from kiln.launch.env import prepare_checkpoint_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a step_* checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", default=None, metavar="{byte,PATH}",
                   help="the tokenizer to write, when the checkpoint's dataset directory is gone "
                        "(default: the one named by the data's manifest.json)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds an earlier export (never any other directory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_checkpoint_tool()
    # Lazy: these import torch, which must follow prepare_checkpoint_tool (TQDM_DISABLE); --help stays quick.
    from kiln.checkpoint.export import export_checkpoint
    from kiln.checkpoint.tokenizer_files import tokenizer_from_option
    from kiln.engine.build import captured_stdout

    try:
        tokenizer = tokenizer_from_option(args.tokenizer) if args.tokenizer else None
        # DeepSpeed's shard consolidation prints its own progress: keep kiln's output to its summary.
        with captured_stdout():
            info = export_checkpoint(args.checkpoint, args.out_dir, tokenizer=tokenizer, overwrite=args.overwrite)
    except KilnError as e:
        print(f"kiln-export: {e}", file=sys.stderr)
        return 2
    s = info["model_shape"]
    print(f"[kiln] exported {info['checkpoint']} (step {info['step']}, {info['parameters']:,} parameters, "
          f"{s['n_layer']} layers x {s['n_embd']}, vocab {s['vocab_size']}, {info['tokenizer']['type']} tokenizer)")
    print(f"[kiln] -> {info['out_dir']}: {', '.join(info['files'])}")
    hf_class = "LlamaForCausalLM" if s.get("arch") == "llama" else "GPT2LMHeadModel"
    print(f"[kiln] load: transformers.{hf_class}.from_pretrained({info['out_dir']!r}); "
          f"sample: kiln-generate {info['out_dir']} --prompt '...'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
