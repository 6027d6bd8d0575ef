"""A/B of train-step variants: the same case under different ModelConfig/TrainConfig fields.

Each variant is the train step `gptjax train` builds (gptjax.bench.build_train_step), all
compiled in this one process and timed alternately (the order flips every repeat), so the
machine's drift hits every variant alike. A variant is a comma-separated list of config
overrides; the empty variant is the preset as it stands. Reported: median ms/step (min-max)
and each variant's ratio to the first, from the same repeats. This is the measurement
behind the entries of benchmarks/NOTES.md.

    python benchmarks/train_step_ab.py --case mini:8:256 attention_impl=xla attention_impl=blocked
    python benchmarks/train_step_ab.py --case baby:12:64 scan_unroll=1 scan_unroll=4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax

from gptjax import bench
from gptjax.config import ModelConfig, TrainConfig, preset
from gptjax.errors import GptjaxError


def parse_variant(text: str, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """'field=value,field=value' applied to whichever config has the field."""
    for item in filter(None, text.split(",")):
        name, sep, raw = item.partition("=")
        target = next((c for c in (model_cfg, train_cfg) if name in
                       {f.name for f in dataclasses.fields(c)}), None)
        if not sep or target is None:
            raise GptjaxError(f"bad variant item {item!r}: expected FIELD=VALUE of a model or "
                              "train config field")
        kind = type(getattr(target, name))
        value = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
        if target is model_cfg:
            model_cfg = dataclasses.replace(model_cfg, **{name: value})
        else:
            train_cfg = dataclasses.replace(train_cfg, **{name: value})
    return model_cfg, train_cfg


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="FIELD=VALUE[,FIELD=VALUE] per variant ('' = as is)")
    ap.add_argument("--case", default="mini:8:256", help="preset:batch:context")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--steps", type=int, default=0, help="steps per repeat (0: about 1 s)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    name, batch, context = args.case.split(":")
    base_model = preset(name, vocab_size=args.vocab, context_length=int(context))
    base_train = TrainConfig(batch_size=int(batch), max_steps=10_000, warmup_steps=10)
    runs = []
    for text in args.variants:
        m, t = parse_variant(text, base_model, base_train)
        step = bench.build_train_step(m, t)
        batches = [step.put(b) for b in bench.random_batches(4, t.batch_size, m.context_length,
                                                             m.vocab_size)]
        state = step.init_state()
        warm, state, _ = bench.time_steps(step, state, batches, 2)
        runs.append({"label": text or "(as is)", "step": step, "batches": batches,
                     "state": state, "warm": warm / 2, "ms": []})
    steps = args.steps or max(1, round(1.0 / min(r["warm"] for r in runs)))
    with bench.no_compiles("the timed train steps"):
        for rep in range(args.repeats):
            for r in (runs if rep % 2 == 0 else runs[::-1]):
                seconds, r["state"], _ = bench.time_steps(r["step"], r["state"], r["batches"], steps)
                r["ms"].append(1000 * seconds / steps)
    info = bench.machine_info()
    print(f"case {args.case}, vocab {args.vocab}, {steps} steps x {args.repeats} alternating "
          f"repeats; {info.get('cpu', jax.default_backend())}, jax {jax.__version__}")
    first = statistics.median(runs[0]["ms"])
    print("| variant | ms/step median (min-max) | vs first |\n|---|---|---|")
    for r in runs:
        med = statistics.median(r["ms"])
        print(f"| {r['label']} | {med:.1f} ({min(r['ms']):.1f}-{max(r['ms']):.1f}) | "
              f"{first / med:.2f}x |")


if __name__ == "__main__":
    main()
