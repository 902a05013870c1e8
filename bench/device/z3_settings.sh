#!/bin/bash
# Device-side driver for the ZeRO-3 settings sweep (issue 15). Run from the repo root copy (.z3):
#   bash bench/device/z3_settings.sh install|single|sweep NPROC TAG SETTINGS [PROFILE_SETTING] [ROWS]
#   bash bench/device/z3_settings.sh plan NPROC TAG ROW@SETTING,ROW@SETTING,... [PROFILE_SETTING]   (explicit order)
#   bash bench/device/z3_settings.sh each NPROC TAG ROW@SETTING,... [MEMORY_SETTING]   (one process per entry: clean peaks)
#   bash bench/device/z3_settings.sh fsdp2 NPROC TAG [bench/fsdp2_memory.py options]   (7B shape, 32 layers, the ZeRO-3 bench's checkpoint)
# Wheels are read from ../.whl (carried); results go to $OUT. SHAPE=70b Z3ARGS=--random-init: another shape, more options.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
case "$1" in
install)
  if [ ! -d /tmp/site/deepspeed ]; then
    t0=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site ../.whl/deepspeed-0.19.8.tar.gz || exit 1
    echo "install took $(( $(date +%s) - t0 )) s"
  fi
  nvidia-smi -L; nproc
  python3 -c "import torch, deepspeed, bitsandbytes, transformers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1
  ;;
single)
  CUDA_VISIBLE_DEVICES=0 python3 bench/train_throughput.py --rows "${3:-svd_scale nf4 r64,peft qlora r16}" --steps 5 --repeat 1 --out $OUT/single_$2.md > $OUT/single_$2.log 2>&1
  grep -E "tok/s" $OUT/single_$2.log
  ;;
sweep)
  N=$2; TAG=$3; SETTINGS=$4; PROF=$5; ROWS=${6:-svd_scale_nf4,peft_qlora}
  t0=$(date +%s)
  timeout ${TLIM:-560} torchrun --nproc_per_node $N bench/zero3_throughput.py --shape ${SHAPE:-7b} $Z3ARGS --rows $ROWS --settings $SETTINGS \
    ${PROF:+--profile $PROF --profile-dir /tmp/prof_$TAG} --json $OUT/$TAG.json --out /tmp/$TAG.md > /tmp/$TAG.log 2>&1
  echo "rc=$? sweep $TAG took $(( $(date +%s) - t0 )) s"
  grep -E "^RESULT|Error|error:|Traceback|OutOfMemory" /tmp/$TAG.log | grep -v "UserWarning" | head -40
  gzip -c /tmp/$TAG.log > $OUT/$TAG.log.gz
  if [ -n "$PROF" ] && [ -d /tmp/prof_$TAG ]; then tar czf $OUT/prof_$TAG.tgz -C /tmp prof_$TAG; fi
  ;;
plan)
  N=$2; TAG=$3; PLAN=$4; PROF=$5
  t0=$(date +%s)
  timeout ${TLIM:-560} torchrun --nproc_per_node $N bench/zero3_throughput.py --shape ${SHAPE:-7b} $Z3ARGS --plan "$PLAN" \
    ${PROF:+--profile $PROF --profile-dir /tmp/prof_$TAG} --json $OUT/$TAG.json --out /tmp/$TAG.md > /tmp/$TAG.log 2>&1
  echo "rc=$? plan $TAG took $(( $(date +%s) - t0 )) s"
  grep -E "^RESULT|Error|error:|Traceback|OutOfMemory" /tmp/$TAG.log | grep -v "UserWarning" | head -40
  gzip -c /tmp/$TAG.log > $OUT/$TAG.log.gz
  if [ -n "$PROF" ] && [ -d /tmp/prof_$TAG ]; then
    grep -H -E "^total self|^- all-gather|^- reduce-scatter|ms profiled" /tmp/prof_$TAG/prof_*.md
    tar czf $OUT/prof_$TAG.tgz -C /tmp prof_$TAG
  fi
  ;;
each)
  N=$2; TAG=$3; PLAN=$4; MEM=$5; i=0; rm -f /tmp/${TAG}_*.json
  for E in ${PLAN//,/ }; do
    i=$((i+1)); t0=$(date +%s)
    timeout ${TLIM:-560} torchrun --nproc_per_node $N bench/zero3_throughput.py --shape ${SHAPE:-7b} $Z3ARGS --plan "$E" \
      ${MEM:+--memory $MEM --profile-dir $OUT/mem_$TAG} --json /tmp/${TAG}_$i.json --out /tmp/${TAG}_$i.md > /tmp/${TAG}_$i.log 2>&1
    echo "rc=$? entry $i ($E) took $(( $(date +%s) - t0 )) s"
    grep -E "^RESULT|Error|error:|Traceback|OutOfMemory|memory summary" /tmp/${TAG}_$i.log | grep -v "UserWarning" | head -20
    gzip -c /tmp/${TAG}_$i.log > $OUT/${TAG}_$i.log.gz
  done
  if [ -d $OUT/mem_$TAG ]; then cat $OUT/mem_$TAG/*.md; tar czf $OUT/mem_$TAG.tgz -C $OUT mem_$TAG && rm -r $OUT/mem_$TAG; fi
  python3 bench/zero3_throughput.py --merge $(ls /tmp/${TAG}_*.json | sort -V) --out $OUT/$TAG.md > /dev/null && \
    python3 -c "import json,sys; json.dump([r for f in sys.argv[1:] for r in json.load(open(f))], open('$OUT/$TAG.json','w'))" $(ls /tmp/${TAG}_*.json | sort -V)
  ;;
fsdp2)
  N=$2; TAG=$3; shift 3; t0=$(date +%s)
  timeout ${TLIM:-560} torchrun --nproc_per_node $N bench/fsdp2_memory.py --layers 32 --ckpt /tmp/svd_scale_zero3_bench_7b \
    --profile-dir /tmp/fprof_$TAG --json $OUT/fsdp2_$TAG.json --out $OUT/fsdp2_$TAG.md "$@" > /tmp/fsdp2_$TAG.log 2>&1
  echo "rc=$? fsdp2 $TAG took $(( $(date +%s) - t0 )) s"
  grep -E "^RESULT|Error|error:|Traceback|OutOfMemory" /tmp/fsdp2_$TAG.log | grep -v "UserWarning" | head -20
  grep -H -E "^total self|^- all-gather|^- reduce-scatter|ms profiled" /tmp/fprof_$TAG/prof_*.md 2>/dev/null
  gzip -c /tmp/fsdp2_$TAG.log > $OUT/fsdp2_$TAG.log.gz
  if [ -d /tmp/fprof_$TAG ]; then tar czf $OUT/fprof_$TAG.tgz -C /tmp fprof_$TAG; fi
  ;;
esac
