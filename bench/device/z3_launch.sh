#!/bin/bash
# Device-side: the product's own launch path on N GPUs, train.compile auto vs false (issue 15).
#   bash bench/device/z3_launch.sh N TOKENIZER_DIR "auto,false,..."      (after z3_settings.sh install)
# Builds a random Llama-2-7B-shape checkpoint whose vocabulary is the tokenizer's, 64 rows of ~2,500
# tokens of text, then runs `deepspeed launch/train.py --config configs/llama2-7b.yaml` once per value of
# train.compile (r=64, NF4, one 2048-token row per GPU per step, 12 steps); prints each run's median step
# seconds from its metrics.json. Results go to $OUT.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site TOKENIZERS_PARALLELISM=false PATH=/tmp/site/bin:$PATH
N=$1; TOK=$2; VALUES=$3; OUT=${OUT:-/tmp/out}; M=/tmp/llama7b_shape; D=/tmp/long.jsonl
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
for c in ${VALUES//,/ }; do
  t0=$(date +%s)
  timeout ${TLIM:-280} deepspeed --num_gpus $N launch/train.py --config configs/llama2-7b.yaml model=$M data=$D \
    adapter.rank=64 adapter.quant=nf4 adapter.quant_iters=1 train.batch_size=1 train.grad_accum=1 train.max_steps=12 \
    train.save_steps=0 train.logging_steps=1 train.report_to=none train.compile=$c train.output_dir=/tmp/run_$c \
    > /tmp/launch_$c.log 2>&1
  echo "rc=$? compile=$c took $(( $(date +%s) - t0 )) s"
  grep -E "^\[svd_scale\]|Error|Traceback|recompile_limit" /tmp/launch_$c.log | grep -v UserWarning | head -20
  cp /tmp/run_$c/metrics.json $OUT/metrics_compile_$c.json 2>/dev/null && python3 -c "import json,sys; m=json.load(open('$OUT/metrics_compile_$c.json')); print('compile=$c', 'median_step_s', m.get('median_step_seconds'), 'tok/s/GPU', round(2048/m['median_step_seconds']) if m.get('median_step_seconds') else None, 'compiled_blocks', m.get('compiled_blocks'), 'losses', [round(l,4) for _,l in m['losses']][:4])"
  gzip -c /tmp/launch_$c.log > $OUT/launch_$c.log.gz
done
