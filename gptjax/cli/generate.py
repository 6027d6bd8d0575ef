"""`gptjax generate`: sampling text from a run or from GPT-2 weights."""

from __future__ import annotations

import dataclasses
import sys

from gptjax import config as C
from gptjax.cli.options import add_checkpoint, add_gpt2_ranks, add_quantize
from gptjax.errors import GptjaxError


def add_parser(sub) -> None:
    ge = sub.add_parser(
        "generate", help="sample text from a trained run or GPT-2 weights",
        description="Continue prompts with a KV cache (one compiled prefill, one compiled decode "
        "loop). One prompt streams to the terminal; several run as one batch. Rows end at "
        "end-of-text, at a --stop string or after --max-new-tokens. A prompt longer than the "
        "context keeps its last context-length tokens (with a warning); once a row's next "
        "position would pass the context, the window slides (slower: recomputed, no cache).")
    source = ge.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="gptjax run directory")
    source.add_argument("--hf", metavar="DIR_OR_NAME", help="GPT-2 weights in the Hugging Face "
                        "layout: a folder with config.json + model.safetensors, or a Hub name "
                        "such as gpt2 (downloads; needs `pip install 'gptjax[hf]'`)")
    ge.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch "
                    "(default: one empty prompt = start of a document)")
    ge.add_argument("--max-new-tokens", type=int, default=200, metavar="INT",
                    help="most new tokens per row (default: 200)")
    ge.add_argument("--temperature", type=float, default=0.8, metavar="FLOAT",
                    help="softmax temperature; 0 = greedy (default: 0.8)")
    ge.add_argument("--top-k", type=int, metavar="INT",
                    help="sample among the k most likely ids (default: all)")
    ge.add_argument("--top-p", type=float, metavar="FLOAT", help="sample from the smallest set of "
                    "ids whose probability reaches p, in (0, 1] (default: off)")
    ge.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="end a row where this text appears (not printed); repeatable")
    ge.add_argument("--ignore-eot", action="store_true", help="do not stop at end-of-text")
    ge.add_argument("--seed", type=int, default=0, metavar="INT", help="sampling seed (default: 0)")
    ge.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast weights and compute "
                    "to this dtype (default: as stored)")
    ge.add_argument("--decode-matmul",
                    choices=C.ModelConfig.__dataclass_fields__["decode_matmul"].metadata["choices"],
                    help="decode steps' products: "
                    "auto = the native CPU kernel where it builds, xla = XLA's (default: the "
                    "run's config, normally auto)")
    add_quantize(ge)
    ge.add_argument("--no-stream", action="store_true", help="print only when finished")
    batch = ge.add_argument_group("batch inference", "prompts from a JSONL file, answered "
                                  "through the serving scheduler (continuous batching)")
    batch.add_argument("--input", metavar="FILE", help="JSONL of {\"id\": ..., \"prompt\": "
                       "\"...\"} records (an id defaults to the line number)")
    batch.add_argument("--output", metavar="FILE", help="JSONL the answers are appended to as "
                       "they finish; the same command again continues with the first id that "
                       "has none")
    batch.add_argument("--max-batch", type=int, default=8, metavar="INT",
                       help="prompts decoded together (default: 8)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_checkpoint(ge, when="with --run: ", default=None)
    add_gpt2_ranks(ge)


def run(args) -> int:
    from gptjax.generation.sampling import Sampling, check_max_new_tokens
    from gptjax.generation.textgen import generate_text
    from gptjax.model.gpt import cast, decode_params
    from gptjax.runs.load import load, load_pretrained

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).check()
    check_max_new_tokens(args.max_new_tokens)
    if (args.input is None) != (args.output is None):
        raise GptjaxError("batch inference takes both --input FILE and --output FILE")
    if args.input and args.prompt:
        raise GptjaxError("give prompts as --prompt or in an --input file, not both")
    if args.max_batch < 1:
        raise GptjaxError("--max-batch must be positive")
    if args.input:
        from gptjax.serve.batch import read_prompts
        read_prompts(args.input)  # a bad file fails before the model loads
    prompts = args.prompt or [""]
    for text in prompts + args.stop:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise GptjaxError(f"not valid UTF-8: {text[:40]!r}") from None
    if args.hf and args.checkpoint:
        raise GptjaxError("--checkpoint picks a checkpoint of a --run; --hf folders have none")
    if args.hf:
        loaded = load_pretrained(args.hf, args.gpt2_ranks)
    else:
        loaded = load(args.run, args.checkpoint or "latest", args.gpt2_ranks)
    params, model_cfg = loaded.params, loaded.config.model
    if args.dtype:
        params, model_cfg = cast(params, model_cfg, args.dtype)
    if args.decode_matmul:
        model_cfg = dataclasses.replace(model_cfg, decode_matmul=args.decode_matmul)
    if args.quantize:
        from gptjax.model.quantize import quantized_config
        model_cfg = quantized_config(model_cfg, args.quantize, args.quant_group)
    if args.input:
        return _batch(args, loaded, decode_params(params, model_cfg), model_cfg, sampling)
    params = decode_params(params, model_cfg)  # the decode layout, once (see gptjax.generation.decoder)
    loaded.params = None  # let the stacked copy go
    for text in prompts:  # text the tokenizer refuses fails here, before any is echoed
        loaded.tokenizer.encode(text)
    stream = len(prompts) == 1 and not args.no_stream

    def show(_row, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream:
        show(0, prompts[0])
    texts = generate_text(params, model_cfg, loaded.tokenizer, prompts, args.max_new_tokens,
                          sampling, stop=args.stop, on_text=show if stream else None,
                          stop_at_eot=not args.ignore_eot)
    if stream:
        print()
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if len(prompts) > 1:
            print(f"--- {i + 1} ---")
        print(prompt + text)
    return 0


def _batch(args, loaded, params, model_cfg, sampling) -> int:
    from gptjax.serve.batch import BatchSettings, run_batch
    from gptjax.serve.served import Served

    served = Served(str(args.run or args.hf), model_cfg, loaded.tokenizer, params, "transcript")
    settings = BatchSettings(args.max_new_tokens, sampling.temperature, sampling.top_k or 0,
                             sampling.top_p or 1.0, sampling.seed, tuple(s for s in args.stop if s),
                             not args.ignore_eot)
    answered = run_batch(served, args.input, args.output, settings, args.max_batch,
                         progress=not args.no_progress)
    print(f"answered {answered} prompt(s) into {args.output}")
    return 0
