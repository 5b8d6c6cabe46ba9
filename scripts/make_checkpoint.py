"""Write a random-weight Hugging Face checkpoint (safetensors) for a config, so that pageport and
Transformers benchmark the same weights: python scripts/make_checkpoint.py CONFIG.json OUT_DIR."""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("out")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--dtype", default="bfloat16")
args = p.parse_args()

torch.manual_seed(args.seed)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
shutil.copy(args.config, out / "config.json")
config = AutoConfig.from_pretrained(out)
device = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
model.save_pretrained(out, safe_serialization=True)
print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
