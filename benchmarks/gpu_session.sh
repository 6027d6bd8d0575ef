#!/usr/bin/env bash
# The throughput issue's GPU measurements, in phases that each fit one 10-minute command
# on a lent GPU machine (benchmarks/NOTES.md, GPU entries, records what they gave).
#
#   bash benchmarks/gpu_session.sh sweep    # GPT-2 124M: bf16, vocab padding, cuDNN, scan, remat
#   bash benchmarks/gpu_session.sh depth    # layers unrolled, batch 32; GPT-2 XL (1558M)
#   bash benchmarks/gpu_session.sh report   # the defaults through `gptjax bench`, decode, prefetch
#   bash benchmarks/gpu_session.sh profile  # where the step's time goes; batch 64 unrolled
#   bash benchmarks/gpu_session.sh xl       # GPT-2 XL at batch 96 and 128; 124M in float32
#   bash benchmarks/gpu_session.sh flags    # XLA:GPU flags, one process each
#   bash benchmarks/gpu_session.sh structure # donated state, the optimizer's own jit
#   bash benchmarks/gpu_session.sh members  # gptjax sweep's vmapped members vs one after another
#
# Each step has its own time limit, so one that hangs or fails leaves the rest to run;
# logs go to $OUT (or ./gpu-out). Run from the repository root.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
ab="python benchmarks/train_step_ab.py"
bf16="dtype=bfloat16"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "=== $name exit $rc"
}

case ${1:-} in
sweep)
    step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv; python -c "import jax, flax, optax; print(jax.__version__, flax.__version__, \
        optax.__version__, jax.devices())"'
    step cudnn_test 120 python -m pytest -q -p no:cacheprovider tests/model/test_attention.py
    # One change at a time from bf16 with XLA's attention under a rolled scan: padded
    # vocabulary, cuDNN's attention, layers unrolled; and rematerialised attention. Every
    # setting is pinned, so the variants mean the same whatever the defaults become.
    rolled="$bf16,scan_unroll=1"
    step ab_features 330 $ab --case gpt2:16:1024 --vocab 50304 --repeats 7 \
        "$rolled,attention_impl=xla,vocab_size=50257" "$rolled,attention_impl=xla" \
        "$rolled,attention_impl=cudnn" "$bf16,attention_impl=cudnn,scan_unroll=12" \
        "$rolled,attention_impl=cudnn,remat=dots_no_batch"
    ;;
depth)
    step precision_tests 90 python -m pytest -q -p no:cacheprovider tests/model/test_attention.py \
        -k "blocked_equals or blocked_gradients"
    # How many layers to unroll (1 measured 53.4 ms, 12 36.1 ms in "sweep"), and batch 32
    # (batch 64 ran out of memory under the rolled scan).
    step ab_unroll 240 $ab --case gpt2:16:1024 --vocab 50304 --repeats 7 \
        "$bf16,attention_impl=cudnn,scan_unroll=12" "$bf16,attention_impl=cudnn,scan_unroll=2" \
        "$bf16,attention_impl=cudnn,scan_unroll=4" "$bf16,attention_impl=cudnn,scan_unroll=12,batch_size=32"
    # GPT-2 XL (1558M): its 25 GB of float32 state leaves room for one variant a process.
    step xl_b16_dots 130 $ab --case gpt2-xl:16:1024 --vocab 50304 --repeats 5 \
        "$bf16,attention_impl=cudnn,scan_unroll=1,remat=dots_no_batch"
    step xl_b64_full 150 $ab --case gpt2-xl:64:1024 --vocab 50304 --repeats 5 \
        "$bf16,attention_impl=cudnn,scan_unroll=1,remat=full"
    ;;
report)
    step auto_tests 120 python -m pytest -q -p no:cacheprovider tests/model/test_attention.py -k "cudnn or auto"
    # The defaults (cuDNN attention, unrolled layers, padded vocabulary), with no overrides.
    step bench_gpt2 300 python -m gptjax bench --preset gpt2 --batch-size 16,32 --context-length 1024 \
        --dtype bfloat16 --json "$out/bench_gpt2.json" --results "$out/RESULTS.md" \
        --decode --decode-batch-size 1,64
    step host_overhead 130 python benchmarks/host_overhead.py --cases gpt2:32:1024 --dtype bfloat16
    ;;
profile)
    # Per-op time of the default step (41.3% MFU at batch 32), and of the rolled scan, which
    # cost ~17 ms a step more at batch 16 ("sweep").
    step profile_b32 150 python benchmarks/profile_step.py --case gpt2:32:1024 --top 40 \
        "$bf16,attention_impl=cudnn,scan_unroll=12"
    step profile_rolled 120 python benchmarks/profile_step.py --case gpt2:16:1024 --top 25 \
        "$bf16,attention_impl=cudnn,scan_unroll=1"
    # Batch 64 unrolled, alone in its process: if it runs out of memory it takes nothing else
    # with it (batch 32 is measured in "report" and "flags").
    defaults="$bf16,attention_impl=cudnn,scan_unroll=12"
    step b64 150 $ab --case gpt2:64:1024 --vocab 50304 --repeats 5 "$defaults"
    ;;
structure)
    # What donating the state and updating inside the step's jit are worth (CPU: nothing
    # resolvable, NOTES XLA:CPU entry 14). Four unrolled compiles of ~62 s each (the split
    # step is two), hence a phase of its own.
    defaults="$bf16,attention_impl=cudnn,scan_unroll=12"
    step ab_structure 420 $ab --case gpt2:16:1024 --vocab 50304 --repeats 7 \
        "$defaults" "$defaults,donate=0" "$defaults,fused_update=0"
    ;;
members)
    # gptjax sweep: N small models in one vmapped step against the same members one after
    # another (CPU: 1.0x once a member's step is compute-bound, RESULTS.md "Sweep").
    step members 300 python benchmarks/sweep_throughput.py --members 8 --repeats 5 \
        --case tiny:8:32 --case baby:8:64 --case mini:8:256
    ;;
xl)
    # GPT-2 XL's largest batch: 64 planned 28.3 GiB of temporaries under remat=full next to
    # 25 GB of state ("depth"). If they grow with the batch (the float32 logits alone are
    # 12.3 GiB at 64), 96 fits in 80 GB and 128 (~57 GiB) does not.
    for b in 96 128; do
        step "xl_b${b}_full" 170 $ab --case "gpt2-xl:$b:1024" --vocab 50304 --repeats 5 \
            "$bf16,attention_impl=cudnn,scan_unroll=1,remat=full"
    done
    # The float32 baseline the bf16 figures have not had (XLA's attention: cuDNN's takes
    # half precision only).
    step gpt2_float32 120 python -m gptjax bench --preset gpt2 --batch-size 16 --context-length 1024 \
        --dtype float32 --repeats 5 --json "$out/gpt2_float32.json"
    ;;
flags)
    # One process per setting (flags are read once per process), the defaults first and last
    # to bracket drift. A flag this jaxlib does not know aborts its own step only (all three
    # parse in jaxlib 0.10.2).
    run_bench() {  # run_bench NAME XLA_FLAGS
        step "$1" 110 env XLA_FLAGS="$2" python -m gptjax bench --preset gpt2 --batch-size 32 \
            --context 1024 --dtype bfloat16 --repeats 5 --json "$out/$1.json"
    }
    run_bench flags_none ""
    run_bench flags_no_triton_gemm "--xla_gpu_enable_triton_gemm=false"
    run_bench flags_triton_fusion "--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"
    run_bench flags_cudnn_layer_norm "--xla_gpu_enable_cudnn_layer_norm=true"
    run_bench flags_none_again ""
    ;;
*)
    echo "usage: $0 sweep|depth|report|profile|xl|flags|structure|members" >&2
    exit 2
    ;;
esac
