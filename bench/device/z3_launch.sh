#!/bin/bash
# Device-side: the product's own launch path on N GPUs, train.compile auto vs false (issue 15).
#   bash bench/device/z3_launch.sh N TOKENIZER_DIR "auto,false,auto:0,..." [NODES]   (after z3_settings.sh install)
# Each value is a train.compile value, optionally with ":GIB" for train.zero3_replicate_residual_gib (e.g. auto:0: every
# residual partitioned; without it the default, a quarter of the GPU: every 7B residual whole).
# Builds a random Llama-2-7B-shape checkpoint whose vocabulary is the tokenizer's, 64 rows of ~2,500
# tokens of text, then runs `deepspeed launch/train.py --config configs/llama2-7b.yaml` once per value of
# train.compile (r=64, NF4, one 2048-token row per GPU per step, 12 steps); prints each run's median step
# seconds from its metrics.json. Results go to $OUT. NODES=2: the multi-node path on this one host, two
# DeepSpeed "nodes" of N/2 GPUs each (hostfile node0/node1, `--include node0:0..@node1:N/2..`, one
# `deepspeed --no_ssh --node_rank K --master_addr 127.0.0.1` launcher per node, as a cluster without ssh runs it).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site TOKENIZERS_PARALLELISM=false PATH=/tmp/site/bin:$PATH
N=$1; TOK=$2; VALUES=$3; NODES=${4:-1}; OUT=${OUT:-/tmp/out}; M=/tmp/llama7b_shape; D=/tmp/long.jsonl
python3 - "$TOK" "$M" "$D" <<'PY'
import json, random, sys, torch
from pathlib import Path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok_dir, m, d = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(tok_dir)
if not (Path(m) / "config.json").is_file():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=len(tok), max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(m); tok.save_pretrained(m)
words = [w for w in "the a of film story actor scene music light dark long short good bad plot river city night day".split()]
rng = random.Random(0)
Path(d).write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2600))}) for _ in range(64)) + "\n")
print("checkpoint and data ready")
PY
ARGS="--config configs/llama2-7b.yaml model=$M data=$D adapter.rank=64 adapter.quant=nf4 adapter.quant_iters=1
  train.batch_size=1 train.grad_accum=1 train.max_steps=12 train.save_steps=0 train.logging_steps=1 train.report_to=none"
H=$(( N / 2 )); INC="node0:$(seq -s, 0 $((H-1)))@node1:$(seq -s, $H $((N-1)))"
printf "node0 slots=$N\nnode1 slots=$N\n" > /tmp/hostfile
for v in ${VALUES//,/ }; do
  t0=$(date +%s); c=${v%%:*}; XA=""
  if [ "$v" != "$c" ]; then XA="train.zero3_replicate_residual_gib=${v#*:}"; fi
  c=${v//:/_g}  # the tag in file names; the compile value is ${v%%:*}
  if [ "$NODES" = 2 ]; then
    pids=()
    for k in 0 1; do
      timeout ${TLIM:-280} python3 -m deepspeed.launcher.runner --hostfile /tmp/hostfile --include $INC --no_ssh --node_rank $k --master_addr 127.0.0.1 \
        --master_port 29611 launch/train.py $ARGS $XA train.compile=${v%%:*} train.output_dir=/tmp/run_$c > /tmp/launch_${c}_node$k.log 2>&1 &
      pids+=($!)
    done
    rc=0; for p in "${pids[@]}"; do wait $p || rc=$?; done
    cat /tmp/launch_${c}_node0.log /tmp/launch_${c}_node1.log > /tmp/launch_$c.log
  else
    timeout ${TLIM:-280} python3 -m deepspeed.launcher.runner --num_gpus $N launch/train.py $ARGS $XA train.compile=${v%%:*} train.output_dir=/tmp/run_$c > /tmp/launch_$c.log 2>&1
    rc=$?
  fi
  echo "rc=$rc compile=$v nodes=$NODES took $(( $(date +%s) - t0 )) s"
  grep -E "^\[svd_scale\]|Error|Traceback|recompile_limit" /tmp/launch_$c.log | grep -v UserWarning | head -20
  cp /tmp/run_$c/metrics.json $OUT/metrics_compile_${c}_n$NODES.json && rm -rf /tmp/run_$c 2>/dev/null && python3 -c "import json,sys; m=json.load(open('$OUT/metrics_compile_${c}_n$NODES.json')); print('compile=$c', 'median_step_s', m.get('median_step_seconds'), 'tok/s/GPU', round(2048/m['median_step_seconds']) if m.get('median_step_seconds') else None, 'compiled_blocks', m.get('compiled_blocks'), 'peak_gib_rank0', m.get('train_peak_gib_rank0'), 'losses', [round(l,4) for _,l in m['losses']][:4])"
  gzip -c /tmp/launch_$c.log > $OUT/launch_${c}_n$NODES.log.gz
done
